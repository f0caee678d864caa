"""Give the cluster's trainer login EDIT on its experiment and registered model, and nothing more.

Every node holds the trainer login (~/.mlflow/credentials, shipped by `ray up`); the admin password stays on
the machine that runs MLflow (a 0600 file made there, see ray_cluster.yaml). This script runs there, as the
admin, after start_mlflow.sh: it creates the trainer user (or sets its password to the file's), the experiment
and the registered model if missing, and grants the trainer EDIT on both. The server's default permission
(NO_PERMISSIONS, set by start_mlflow.sh) keeps every other experiment and model out of the trainer's reach.
Running it again changes nothing.

  MLFLOW_AUTH_ADMIN_PASSWORD_FILE=~/mlflow-server/admin_password \\
      python cluster/mlflow_access.py --uri http://127.0.0.1:5000 --experiment dcgan --model dcgan-generator
"""

from __future__ import annotations

import argparse
import configparser
import os
import sys
import time
import urllib.request
import warnings
from pathlib import Path


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_login(path: Path) -> tuple[str, str]:
    """(username, password) from an MLflow credentials file, the one MLflow clients read."""
    parser = configparser.ConfigParser()
    if not parser.read(path) or not parser.has_section("mlflow"):
        fail(f"{path}: no [mlflow] section with mlflow_tracking_username and mlflow_tracking_password")
    login = parser["mlflow"]
    user, password = login.get("mlflow_tracking_username", ""), login.get("mlflow_tracking_password", "")
    if not user or len(password) < 12:
        fail(f"{path}: needs mlflow_tracking_username and a mlflow_tracking_password of 12 or more characters")
    return user, password


def admin_password() -> str:
    """From MLFLOW_AUTH_ADMIN_PASSWORD, else the file MLFLOW_AUTH_ADMIN_PASSWORD_FILE names (as start_mlflow.sh)."""
    if os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        return os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    path = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD_FILE")
    if not path or not Path(path).expanduser().is_file():
        fail("set MLFLOW_AUTH_ADMIN_PASSWORD_FILE (or MLFLOW_AUTH_ADMIN_PASSWORD) to the server's admin password")
    return Path(path).expanduser().read_text().strip()


def wait_until_up(uri: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except OSError as e:
            if time.time() > deadline:
                fail(f"MLflow at {uri} not up after {timeout_s:.0f} s ({e})")
            time.sleep(1)


def grant_edit(auth, user: str, resource_type: str, resource_id: str) -> None:
    """EDIT exactly, whatever the user held on the resource before (a hand-given MANAGE goes back to EDIT)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(user, resource_type, resource_id, "EDIT")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(user, resource_type, resource_id)
        auth.grant_user_permission(user, resource_type, resource_id, "EDIT")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", default="http://127.0.0.1:5000", help="the MLflow server (basic auth on)")
    p.add_argument("--trainer-credentials", type=Path, default=Path("~/.mlflow/credentials").expanduser(),
                   help="the credentials file every node holds (default: ~/.mlflow/credentials)")
    p.add_argument("--experiment", action="append", default=None, help="experiment(s) to grant (default: dcgan)")
    p.add_argument("--model", action="append", default=None,
                   help="registered model(s) to grant (default: dcgan-generator)")
    p.add_argument("--admin-user", default=os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"))
    p.add_argument("--wait", type=float, default=120, help="seconds to wait for the server to come up")
    args = p.parse_args()
    user, password = read_login(args.trainer_credentials)
    if user == args.admin_user:
        fail(f"{args.trainer_credentials}: the trainer login must not be the admin ('{user}')")
    # This process acts as the admin; the environment wins over the credentials file for MLflow's clients.
    os.environ.update(MLFLOW_TRACKING_USERNAME=args.admin_user, MLFLOW_TRACKING_PASSWORD=admin_password())
    wait_until_up(args.uri, args.wait)

    with warnings.catch_warnings():  # the server package's imports warn about their own dependencies
        warnings.simplefilter("ignore")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from mlflow.server import get_app_client

    auth, client = get_app_client("basic-auth", tracking_uri=args.uri), MlflowClient(args.uri)
    try:
        try:
            auth.get_user(user)
            auth.update_user_password(user, password)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            auth.create_user(user, password)
        for name in args.experiment or ["dcgan"]:
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            grant_edit(auth, user, "experiment", experiment_id)
        for name in args.model or ["dcgan-generator"]:
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name)
            grant_edit(auth, user, "registered_model", name)
    except MlflowException as e:
        fail(f"MLflow at {args.uri} refused the admin ({args.admin_user}): {e.message.splitlines()[0]}")
    print(f"'{user}' has EDIT on experiment(s) {args.experiment or ['dcgan']} and model(s) "
          f"{args.model or ['dcgan-generator']} at {args.uri}")


if __name__ == "__main__":
    main()
