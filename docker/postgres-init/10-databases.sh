#!/usr/bin/env bash
# Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d):
# one login role and one database each for MLflow's backend store and Optuna's study storage,
# and neither role may connect to the other's database.
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set: copy docker/.env.example to docker/.env}"
: "${OPTUNA_DB_PASSWORD:?OPTUNA_DB_PASSWORD must be set: copy docker/.env.example to docker/.env}"

# psql reads the passwords from the environment (\getenv, psql 15+), so they never appear in its
# arguments; :'var' quotes them as SQL literals, so any character in them is safe.
psql --no-psqlrc -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" \
    --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\getenv mlflow_password MLFLOW_DB_PASSWORD
\getenv optuna_password OPTUNA_DB_PASSWORD
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE optuna LOGIN PASSWORD :'optuna_password';
CREATE DATABASE optuna OWNER optuna;
REVOKE CONNECT ON DATABASE mlflow FROM PUBLIC;
REVOKE CONNECT ON DATABASE optuna FROM PUBLIC;
SQL
