# The MLflow tracking server image for infra/mlflow.yaml: the official image plus the PostgreSQL
# driver (backend and auth stores), boto3 (S3-compatible artifact store) and Flask-WTF (the
# basic-auth app, `mlflow[auth]`). The build context is unused:
#   docker build -f infra/mlflow.Dockerfile -t recompose-mlflow:3.17.2 infra/
# Keep the MLflow version equal to the client's (pip show mlflow) so the stores' schemas match.
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.5 Flask-WTF==1.3.0

# The server writes nothing locally (runs in PostgreSQL, artifacts in the bucket): run it unprivileged.
USER 1000:1000
