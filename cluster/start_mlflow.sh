#!/usr/bin/env bash
# Start the shared MLflow tracking server (foreground; run it under tmux/systemd, or let ray_cluster.yaml do it).
#
#   cluster/start_mlflow.sh
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow cluster/start_mlflow.sh
#   MLFLOW_AUTH=basic MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... cluster/start_mlflow.sh
#
# Settings (environment; none of them are secrets except the auth ones, which stay in the environment):
#   MLFLOW_STATE_DIR              where the sqlite stores and local artifacts live ($HOME/mlflow-server)
#   MLFLOW_BACKEND_STORE_URI      runs and registry: sqlite:///$MLFLOW_STATE_DIR/mlflow.db by default, or
#                                 postgresql+psycopg2://user@host:5432/mlflow (password from PGPASSWORD or ~/.pgpass)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go: $MLFLOW_STATE_DIR/artifacts by default, or s3://bucket/prefix.
#                                 The server proxies artifacts, so only it needs S3 access (instance profile or
#                                 the AWS_* variables; AWS_ENDPOINT_URL_S3 for S3-compatible stores).
#   MLFLOW_HOST / MLFLOW_PORT     bind address (127.0.0.1: reach it through an SSH tunnel) and port (5000)
#   MLFLOW_WORKERS                server processes (MLflow's own setting; 1 here, not MLflow's 4: a sqlite store
#                                 takes one writer at a time, and each worker costs ~300 MB). More help with a
#                                 PostgreSQL store, and with basic auth when the login cache is off.
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers the server answers (MLflow's own setting; its default: localhost and
#                                 private 10.*, 172.16-31.*, 192.168.* addresses, so cluster nodes in a VPC work)
#   MLFLOW_AUTH=basic             turn on MLflow's basic-auth app. The admin login (set on first start) is
#                                 MLFLOW_AUTH_ADMIN_USERNAME (admin) with MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters)
#                                 or the password in the mode-600 file MLFLOW_AUTH_ADMIN_PASSWORD_FILE names.
#                                 MLFLOW_FLASK_SERVER_SECRET_KEY: any long random string (a fresh one if unset).
#                                 Users see nothing they were not granted: cluster/mlflow_access.py gives the
#                                 trainer login (~/.mlflow/credentials on the nodes) EDIT on its experiment.
#   MLFLOW_AUTH_CACHE_TTL_S       seconds a checked login is remembered (60; 0: check every request). MLflow's own
#                                 cache (auth_cache_ttl_seconds): the password hash, slow on purpose (~150 ms of CPU),
#                                 runs once a minute per login instead of on every request; a password changed or a
#                                 user deleted through MLflow's API takes effect at once with one server worker (with
#                                 more, on the others within the TTL).
set -euo pipefail

state="${MLFLOW_STATE_DIR:-$HOME/mlflow-server}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$state/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$state/artifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
args=()

case "${MLFLOW_AUTH:-}" in
  "") ;;
  basic)
    file="${MLFLOW_AUTH_ADMIN_PASSWORD_FILE:-}"
    if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] && [ -n "$file" ]; then  # made on this machine, never shipped
      if [ ! -f "$file" ]; then echo "error: MLFLOW_AUTH_ADMIN_PASSWORD_FILE $file does not exist" >&2; exit 2; fi
      if [ -n "$(find "$file" -perm /077)" ]; then
        echo "error: MLFLOW_AUTH_ADMIN_PASSWORD_FILE $file is readable by others (chmod 600 it)" >&2; exit 2
      fi
      MLFLOW_AUTH_ADMIN_PASSWORD="$(tr -d '\n' < "$file")"
    fi
    MLFLOW_AUTH_ADMIN_PASSWORD="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
    if [ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -lt 12 ]; then
      echo "error: MLFLOW_AUTH=basic needs an admin password of 12 or more characters" \
        "(MLFLOW_AUTH_ADMIN_PASSWORD or MLFLOW_AUTH_ADMIN_PASSWORD_FILE)" >&2; exit 2
    fi
    export MLFLOW_AUTH_ADMIN_PASSWORD
    if [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] && [ "${#MLFLOW_FLASK_SERVER_SECRET_KEY}" -lt 32 ]; then
      echo "error: MLFLOW_FLASK_SERVER_SECRET_KEY is shorter than 32 characters (leave it unset for a random one)" >&2
      exit 2
    fi
    export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
    if ! [[ "${MLFLOW_AUTH_CACHE_TTL_S:-60}" =~ ^[0-9]+$ ]]; then
      echo "error: MLFLOW_AUTH_CACHE_TTL_S must be a whole number of seconds, got '${MLFLOW_AUTH_CACHE_TTL_S}'" >&2; exit 2
    fi
    # The users database sits next to the runs; the admin password comes from the environment, not this file.
    cat > "$state/basic_auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$state/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_S:-60}
INI
    export MLFLOW_AUTH_CONFIG_PATH="$state/basic_auth.ini"
    args+=(--app-name basic-auth)
    ;;
  *) echo "error: MLFLOW_AUTH must be empty or 'basic', got '${MLFLOW_AUTH}'" >&2; exit 2 ;;
esac

# MLflow 3's server starts three job-queue consumers (for GenAI scorers) by default: ~800 MB and seconds of CPU
# this project never uses. Off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

echo "mlflow server: runs in ${backend%%://*}://..., artifacts in $artifacts, http://$host:$port${MLFLOW_AUTH:+ (basic auth)}" >&2
exec "${MLFLOW_EXE:-mlflow}" server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-1}" "${args[@]}"
