"""The run tally (experiments.models.RunTally) and the triggers that keep it: on PostgreSQL once
per statement (a sweep's bulk insert is one update of the tally), on SQLite once per row."""

from django.db import migrations, models

POSTGRES = """
CREATE FUNCTION experiments_run_tally_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO experiments_runtally (id, runs) SELECT 1, count(*) FROM new_runs
  ON CONFLICT (id) DO UPDATE SET runs = experiments_runtally.runs + EXCLUDED.runs;
  RETURN NULL;
END $$;
CREATE FUNCTION experiments_run_tally_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE experiments_runtally SET runs = runs - (SELECT count(*) FROM old_runs) WHERE id = 1;
  RETURN NULL;
END $$;
CREATE FUNCTION experiments_run_tally_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM experiments_runtally;
  RETURN NULL;
END $$;
CREATE TRIGGER experiments_run_tally_insert AFTER INSERT ON experiments_run
  REFERENCING NEW TABLE AS new_runs FOR EACH STATEMENT
  EXECUTE FUNCTION experiments_run_tally_insert();
CREATE TRIGGER experiments_run_tally_delete AFTER DELETE ON experiments_run
  REFERENCING OLD TABLE AS old_runs FOR EACH STATEMENT
  EXECUTE FUNCTION experiments_run_tally_delete();
CREATE TRIGGER experiments_run_tally_truncate AFTER TRUNCATE ON experiments_run
  FOR EACH STATEMENT EXECUTE FUNCTION experiments_run_tally_truncate();
INSERT INTO experiments_runtally (id, runs) SELECT 1, count(*) FROM experiments_run;
"""
POSTGRES_REVERSE = """
DROP TRIGGER experiments_run_tally_insert ON experiments_run;
DROP TRIGGER experiments_run_tally_delete ON experiments_run;
DROP TRIGGER experiments_run_tally_truncate ON experiments_run;
DROP FUNCTION experiments_run_tally_insert();
DROP FUNCTION experiments_run_tally_delete();
DROP FUNCTION experiments_run_tally_truncate();
"""
SQLITE = [
    """CREATE TRIGGER experiments_run_tally_insert AFTER INSERT ON experiments_run BEGIN
  INSERT INTO experiments_runtally (id, runs) VALUES (1, 1)
  ON CONFLICT (id) DO UPDATE SET runs = runs + 1;
END""",
    """CREATE TRIGGER experiments_run_tally_delete AFTER DELETE ON experiments_run BEGIN
  UPDATE experiments_runtally SET runs = runs - 1 WHERE id = 1;
END""",
    "INSERT INTO experiments_runtally (id, runs) SELECT 1, count(*) FROM experiments_run",
]
SQLITE_REVERSE = [
    "DROP TRIGGER experiments_run_tally_insert",
    "DROP TRIGGER experiments_run_tally_delete",
]


def forward(apps, schema_editor):
    run_all(
        schema_editor, [POSTGRES] if schema_editor.connection.vendor == "postgresql" else SQLITE
    )


def backward(apps, schema_editor):
    postgres = schema_editor.connection.vendor == "postgresql"
    run_all(schema_editor, [POSTGRES_REVERSE] if postgres else SQLITE_REVERSE)


def run_all(schema_editor, statements):
    with schema_editor.connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("experiments", "0011_run_slurm_elapsed")]

    operations = [
        migrations.CreateModel(
            name="RunTally",
            fields=[
                (
                    "id",
                    models.PositiveSmallIntegerField(default=1, primary_key=True, serialize=False),
                ),
                ("runs", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.RunPython(forward, backward),
    ]
