"""Every test gets a real MLflow tracking store (SQLite under tmp_path), as MLflow's own suite does."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from servers import mlflow_server, postgres_bin, postgres_server

# Keep test runs off the user's caches.
os.environ.setdefault("ZOO_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "zoo"))


def use_tracking_store(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point MLflow (in-process and subprocesses) at a SQLite store with artifacts in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(folder)  # the default artifact root (./mlruns) lands here too
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(autouse=True)
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = use_tracking_store(tmp_path / "tracking", monkeypatch)
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def mnist_5k():
    from zoo.data import load_dataset

    return load_dataset("mnist-5k")


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory: pytest.TempPathFactory, mnist_5k):
    """One mnist_cnn trained for 2 epochs on mnist-5k, registered as models:/digits@champion, in its own store."""
    from training.train import train
    from training.train_config import TrainConfig

    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_tracking_store(folder, mp)
        result = train(TrainConfig(epochs=2, progress=False), dataset=mnist_5k, register="digits", alias="champion")
    mlflow.set_tracking_uri(None)
    return {"folder": folder, "uri": uri, "result": result, "model_uri": "models:/digits@champion"}


@pytest.fixture
def registered_model(trained_store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Switch this test to the store holding models:/digits@champion; returns the trained_store dict."""
    use_tracking_store(trained_store["folder"], monkeypatch)
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    return trained_store


@pytest.fixture
def postgres() -> str:
    """A private PostgreSQL server for one test with databases ``optuna`` and ``mlflow``; yields
    ``postgresql://zoo@127.0.0.1:PORT`` (append ``/optuna`` or ``/mlflow``)."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries not found (initdb, pg_ctl); install them with "
                    "`apt-get install -y postgresql` to run this test")
    with postgres_server("optuna", "mlflow") as url:
        yield url


@pytest.fixture
def mlflow_tracking_server(postgres: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real ``mlflow server`` on a loopback port: PostgreSQL backend store (database ``mlflow``),
    artifacts served from a folder under tmp_path. This test and its subprocesses track to it."""
    with mlflow_server(f"{postgres}/mlflow", tmp_path / "served-artifacts") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        yield url
        mlflow.set_tracking_uri(None)
