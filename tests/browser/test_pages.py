"""The pages in a real browser: Debian chromium driven by Playwright against live_server.

Screenshots land in test-artifacts/screenshots/ for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.utils import timezone

from experiments import services
from experiments.actors import Actor
from experiments.choices import PlanStatus, RunStatus
from experiments.models import GpuLease, Plan, Run
from tests.factories import GpuFactory, HostFactory

# Playwright's sync API runs an event loop in this thread; Django's ORM calls made here
# by the test itself (fixtures, assertions) are still plain synchronous calls.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
PASSWORD = "pw-for-tests-only"  # tests.factories.UserFactory


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser, live_server, transactional_db):  # type: ignore[no-untyped-def]
    contexts = []

    def make():  # type: ignore[no-untyped-def]
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        # Stop and archive ask for confirmation; a person would press OK.
        page.on("dialog", lambda dialog: dialog.accept())
        return page

    yield make
    for context in contexts:
        context.close()


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def log_in(page, live_server, username: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(live_server.url + "/")
    assert "/login" in page.url  # every page needs a session
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(live_server.url + "/")


def as_user(person) -> Actor:  # type: ignore[no-untyped-def]
    return Actor(kind="user", user=person.user)


def seed_lab(person) -> None:  # type: ignore[no-untyped-def]
    """A few runs in different states, so the pages show what a lab looks like."""
    system = Actor.system()
    host = HostFactory(name="gpu-node-1", state="online", last_seen_at=timezone.now())
    gpus = [GpuFactory(host=host, index=i) for i in range(4)]
    done = services.run_create(
        actor=as_user(person),
        name="resnet50-baseline",
        command="python train.py",
        gpus=1,
        auto_start=True,
    )
    failed = services.run_create(
        actor=as_user(person),
        name="vit-b16-lr1e-3",
        command="python train.py --lr 1e-3",
        gpus=1,
        auto_start=True,
    )
    running = services.run_create(
        actor=as_user(person),
        name="vit-b16-lr3e-4",
        command="python train.py --lr 3e-4",
        gpus=2,
        auto_start=True,
    )
    for run in (done, failed, running):
        services.run_transition(
            run_id=run.id, to=RunStatus.LAUNCHING, actor=system, fields={"host": host}
        )
        services.run_transition(run_id=run.id, to=RunStatus.RUNNING, actor=system)
    services.run_transition(
        run_id=done.id,
        to=RunStatus.FINISHED,
        actor=system,
        reason="exit_code",
        fields={"exit_code": 0},
    )
    services.run_transition(
        run_id=failed.id,
        to=RunStatus.FAILED,
        actor=system,
        reason="cuda_oom",
        fields={"exit_code": 1, "error": "torch.OutOfMemoryError: CUDA out of memory."},
    )
    for gpu in gpus[:2]:
        GpuLease.objects.create(gpu=gpu, run=running)
    gpus[0].memory_used_mb, gpus[0].utilization_pct = 61_440, 98
    gpus[1].memory_used_mb, gpus[1].utilization_pct = 58_000, 95
    for gpu in gpus[:2]:
        gpu.save()


def test_member_logs_in_creates_a_run_and_sees_it_queued(new_page, live_server, member):
    seed_lab(member)
    page = new_page()
    log_in(page, live_server, "alice")

    page.click("a:has-text('New run')")
    page.wait_for_url("**/runs/new")
    page.fill("#id_name", "browser-run")
    page.fill("#id_command", "python train.py --epochs 3")
    page.fill("#id_gpus", "1")
    assert page.is_checked("#id_auto_start")  # "Start now" is the default
    page.click("button:has-text('Create run')")

    run = Run.objects.get(name="browser-run")
    page.wait_for_url(f"**/runs/{run.id}")
    assert run.status == RunStatus.QUEUED and run.created_by == member.user
    assert page.inner_text("#run-status .badge-lg") == "Queued"
    assert "browser-run created (queued)" in page.inner_text(".messages")
    assert page.is_visible("#run-status button:has-text('Stop')")
    shot(page, "run_detail")

    page.click("a:has-text('Runs')")
    page.wait_for_url(live_server.url + "/")
    row = page.locator("#runs-live tr", has_text="browser-run")
    assert row.locator(".badge").inner_text() == "queued"
    assert page.locator("#runs-live tbody tr").count() == 4
    shot(page, "dashboard")

    # The table is live: a change made elsewhere shows up without a reload.
    services.run_stop(run=run, actor=as_user(member))
    row.locator(".badge-stopped").wait_for(timeout=8_000)


def test_run_page_polls_until_the_run_ends_then_stops(new_page, live_server, member):
    watched = services.run_create(actor=as_user(member), command="sleep 100", auto_start=True)
    page = new_page()
    log_in(page, live_server, "alice")
    polls: list[int] = []
    page.on(
        "response",
        lambda r: polls.append(r.status) if r.request.headers.get("hx-request") else None,
    )
    page.goto(f"{live_server.url}/runs/{watched.id}")
    assert page.get_attribute("#run-status", "hx-trigger") == "every 3s"

    # Stopped elsewhere (the API, another tab): the status block catches up by itself,
    # and the 286 that carried the final state also ended the polling.
    services.run_stop(run=watched, actor=as_user(member))
    page.locator("#run-status .badge-lg", has_text="Stopped").wait_for(timeout=8_000)
    assert polls[-1] == 286
    seen = len(polls)
    page.wait_for_timeout(4_000)
    assert len(polls) == seen
    assert not page.is_visible("#run-status button:has-text('Stop')")

    # The Stop button itself (with its confirm dialog accepted).
    clicked = services.run_create(actor=as_user(member), command="sleep 100", auto_start=True)
    page.goto(f"{live_server.url}/runs/{clicked.id}")
    page.click("#run-status button:has-text('Stop')")
    page.locator("#run-status .badge-lg", has_text="Stopped").wait_for()
    assert f"Run {clicked.id} stopped." in page.inner_text(".messages")
    clicked.refresh_from_db()
    assert clicked.status == RunStatus.STOPPED
    assert clicked.events.last().actor_user == member.user
    assert page.get_attribute("#run-status", "hx-trigger") is None


def test_pi_approves_a_plan_and_its_held_run_queues(new_page, live_server, member, pi):
    plan = services.plan_create(
        actor=as_user(member),
        title="Does a wider MLP help ViT-B/16 on ImageNet-1k?",
        goal="Find whether widening the MLP ratio from 4 to 6 improves top-1 at equal compute.",
        raw_markdown=(
            "## Objective\nCompare MLP ratio 4 vs 6 on ViT-B/16.\n\n"
            "## Compute Setup\n2 x A100 80GB per run, bf16.\n\n"
            "## Parameters to Sweep\n- mlp_ratio: [4, 6]\n- seed: [1, 2, 3]\n\n"
            "## Metrics\nval/top1 (higher is better), train/loss\n\n"
            "## Estimated Effort\n6 runs x 10 h = 120 GPU-hours\n"
        ),
    )
    plan = services.plan_submit(plan=plan, actor=as_user(member))
    held = services.run_create(
        actor=as_user(member),
        name="vit-mlp6-seed1",
        command="python train.py --mlp-ratio 6",
        gpus=2,
        plan=plan,
        auto_start=True,
    )
    assert held.status == RunStatus.HELD

    page = new_page()
    log_in(page, live_server, "carol")
    page.click("nav >> text=Plans")
    page.click(f"a:has-text('{plan.title}')")
    page.wait_for_url(f"**/plans/{plan.id}")
    assert page.is_visible("h3:has-text('Compute Setup')")
    assert page.locator("tr", has_text="vit-mlp6-seed1").locator(".badge").inner_text() == "held"
    shot(page, "plan_detail_review")

    page.fill("#id_approve-comment", "Approved; keep to the budget.")
    page.fill("#id_approve-gpu_hours_budget", "120")
    page.click("button:has-text('Approve')")
    page.wait_for_url(f"**/plans/{plan.id}")
    assert "Plan approved." in page.inner_text(".messages")
    assert page.inner_text("h1 .badge") == "Approved"
    assert page.locator("tr", has_text="vit-mlp6-seed1").locator(".badge").inner_text() == "queued"
    assert not page.is_visible("#approve-form")
    shot(page, "plan_detail")

    plan.refresh_from_db()
    held.refresh_from_db()
    assert plan.status == PlanStatus.APPROVED and plan.reviewer == pi.user
    assert plan.gpu_hours_budget == 120
    assert held.status == RunStatus.QUEUED

    page.click("a:has-text('vit-mlp6-seed1')")
    page.wait_for_url(f"**/runs/{held.id}")
    assert page.inner_text("#run-status .badge-lg") == "Queued"
    assert "plan_approved" in page.inner_text("#run-status table")


def test_cluster_page_renders_the_gpu_board(new_page, live_server, member):
    seed_lab(member)
    node2 = HostFactory(name="gpu-node-2", state="online", last_seen_at=timezone.now())
    GpuFactory(
        host=node2,
        index=0,
        name="NVIDIA RTX A6000",
        memory_total_mb=49140,
        memory_used_mb=20_000,
        utilization_pct=71,
        processes=[{"pid": 4242, "used_memory_mb": 20000}],
    )
    GpuFactory(
        host=node2,
        index=1,
        name="NVIDIA RTX A6000",
        memory_total_mb=49140,
        memory_used_mb=3_000,
        utilization_pct=45,
    )
    HostFactory(
        name="cpu-box",
        kind="local",
        state="online",
        state_note="CPU host: 32 cores, 256 GB RAM, no NVIDIA GPU",
    )
    page = new_page()
    log_in(page, live_server, "alice")
    page.click("nav >> text=Cluster")
    page.wait_for_url("**/cluster")

    assert page.locator(".gpu").count() == 6
    assert page.locator(".gpu-leased").count() == 2
    assert page.locator(".gpu-busy_foreign").count() == 1
    assert page.locator(".gpu-busy").count() == 1
    assert page.locator(".gpu-free").count() == 2
    running = Run.objects.get(name="vit-b16-lr3e-4")
    assert page.locator(f".gpu-leased a:has-text('{running.id}')").count() == 2
    assert "CPU host: 32 cores" in page.inner_text("section.host:has-text('cpu-box')")
    assert page.get_attribute("#cluster-board", "hx-trigger") == "every 5s"
    shot(page, "cluster")

    # The board refreshes by itself.
    GpuLease.objects.filter(run=running).update(released_at=timezone.now())
    page.wait_for_function("document.querySelectorAll('.gpu-leased').length === 0", timeout=12_000)
    assert Plan.objects.count() == 0


def test_token_page_shows_the_token_once_and_it_works(new_page, live_server, member):
    page = new_page()
    page.goto(live_server.url + "/login")
    shot(page, "login")
    log_in(page, live_server, "alice")
    page.click("nav >> text=API tokens")
    page.fill("#id_name", "laptop")
    page.click("button:has-text('Create token')")
    raw = page.inner_text("#raw-token").strip()
    assert raw.startswith("lab_")
    assert f"X-Auth-Token: {raw}" in page.inner_text("body")
    shot(page, "token_created")

    api = page.request.get(live_server.url + "/api/cluster", headers={"X-Auth-Token": raw})
    assert api.status == 200 and "gpus" in api.json()

    page.click("a:has-text('Done')")
    assert raw not in page.content()
    row = page.locator("tr", has_text="laptop")
    row.locator("button:has-text('Revoke')").click()
    page.locator("tr", has_text="laptop").locator(".badge-stopped").wait_for()
    api = page.request.get(live_server.url + "/api/cluster", headers={"X-Auth-Token": raw})
    assert api.status == 401
    shot(page, "tokens")


def test_sweep_pages_and_run_form(new_page, live_server, member):
    sweep = services.sweep_create_grid(
        actor=as_user(member),
        name="lr-sweep",
        goal="Learning rate for the small ViT.",
        base_command="python train.py --model vit-s16",
        parameters={"lr": [0.001, 0.0003], "seed": [1, 2]},
        auto_start=True,
    )
    first = sweep.runs.order_by("created_at", "id").first()
    services.run_stop(run=first, actor=as_user(member))
    page = new_page()
    log_in(page, live_server, "alice")
    page.click("nav >> text=Sweeps")
    row = page.locator("tr", has_text="lr-sweep")
    assert "1 / 4 done" in row.inner_text()
    shot(page, "sweeps")
    row.locator("a:has-text('lr-sweep')").click()
    page.wait_for_url(f"**/sweeps/{sweep.id}")
    assert page.locator("tbody tr").count() == 4
    shot(page, "sweep_detail")

    page.click("a:has-text('Add a run')")
    page.wait_for_url("**/runs/new?sweep=*")
    assert page.input_value("#id_sweep") == sweep.id
    page.fill("#id_command", "   ")
    page.click("button:has-text('Create run')")
    assert page.is_visible(".field.has-error .error")
    assert sweep.runs.count() == 4
    shot(page, "run_form_error")
