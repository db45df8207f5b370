# The recommendation service (and, with another command, the nightly job / scheduler).
#   docker build -t recs .
#   docker run -e REDIS_URL=redis://redis:6379/0 -p 8000:8000 recs
#   docker run -e REDIS_URL=... -v /data:/data recs python -m jobs.nightly --events /data/events.csv --catalog /data/catalog.csv
#   docker run -e REDIS_URL=... -e TRAIN_ENGINE=spark -e SPARK_MASTER=spark://master:7077 -v /data:/data recs python -m jobs.nightly ...
#   docker run -e REDIS_URL=... -e EVENTS_PATH='/data/events/*.parquet' -e CATALOG_PATH=/data/catalog.csv -v /data:/data recs python -m jobs.scheduler
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OPENBLAS_NUM_THREADS=1 \
    MODEL_CACHE_DIR=/var/cache/recs-models \
    SPARK_LOG=/tmp/recs-spark.log \
    PORT=8000

# annoy compiles from source; build tools are removed after install. Java 17 and OpenBLAS are for
# the Spark training engine (--engine spark; the same image serves as its executors' Python).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential curl openjdk-17-jre-headless libopenblas0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv
COPY requirements.txt .
# The CPU build of torch (the default index would pull a multi-GB CUDA build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -r requirements.txt \
 && apt-get purge -y build-essential && apt-get autoremove -y

COPY app ./app
COPY models ./models
COPY jobs ./jobs
COPY gunicorn.conf.py .

RUN useradd --system --uid 10001 recs && mkdir -p /var/cache/recs-models && chown recs /var/cache/recs-models
USER recs
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s CMD curl -fs http://localhost:${PORT}/healthz || exit 1
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
