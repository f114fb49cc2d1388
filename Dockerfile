FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY labsite labsite
COPY clusters clusters
COPY experiments experiments
RUN pip install --no-cache-dir .
COPY . .
EXPOSE 8000
