"""bench/quality.py's workdir data record: a workdir is reused only for the data it was built from."""

import argparse
import json

import pytest

from bench.common import load_bench


quality = load_bench("quality")


def args_for(workdir, dataset):
    return argparse.Namespace(
        workdir=str(workdir), dataset=[dataset], dataset_config=None, no_wikitext=False, wikitext="/data/wiki.test.raw"
    )


def test_a_workdir_recorded_with_machine_paths_is_reused_for_the_same_data(tmp_path):
    (tmp_path / "data").mkdir()
    recorded = {"dataset": ["/data/shakespeare/input.txt"], "dataset_config": None, "wikitext": "/data/wiki.test.raw"}
    (tmp_path / "data" / "done").write_text(json.dumps(recorded))  # as workdirs recorded paths before `portable`
    quality.prepare_data(args_for(tmp_path, "/data/shakespeare/input.txt"))  # returns: nothing to build
    with pytest.raises(SystemExit, match="holds data built from"):
        quality.prepare_data(args_for(tmp_path, "/data/other.txt"))
