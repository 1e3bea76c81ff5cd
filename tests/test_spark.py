"""docs/spark.md's job, as the document gives it: a registered model classifies a folder of real digits on
a local Spark (``local[2]``) through ``mlflow.pyfunc.spark_udf``, with the labels `zoo classify` gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.bench_spark import spark_env, spark_job, spark_labels
from zoo.cli.demo import write_digit_images
from zoo.cli.main import cli

pytestmark = pytest.mark.slow


@pytest.fixture
def java() -> str:
    found = shutil.which("java")
    if found is None:
        pytest.skip("Spark needs Java and `java` is not on PATH; `make system-packages` (scripts/system-packages.sh) "
                    "installs Debian's default-jre-headless")
    return found


def test_the_documented_spark_job_labels_a_folder_as_zoo_classify_does(registered_model, java, mnist_5k, tmp_path):
    test = mnist_5k.test.subset(20)
    folder = tmp_path / "scans"
    write_digit_images(test.images[:10], test.labels[:10], mnist_5k.classes, folder)
    write_digit_images(test.images[10:], test.labels[10:], mnist_5k.classes, folder / "more")  # recursiveFileLookup
    (folder / "notes.txt").write_text("not an image: pathGlobFilter leaves it out")
    output = tmp_path / "labels.parquet"
    job = tmp_path / "classify_scans.py"
    job.write_text(spark_job(registered_model["model_uri"], folder, output))

    ran = subprocess.run([sys.executable, str(job)], env=spark_env(dict(os.environ)), cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]

    res = CliRunner().invoke(cli, ["classify", registered_model["model_uri"], str(folder), "--format", "json"])
    assert res.exit_code == 0, res.output
    expected = {str(Path(row["path"]).relative_to(folder)): row["label"] for row in json.loads(res.stdout)}
    assert len(expected) == 20
    assert spark_labels(output, folder) == expected
