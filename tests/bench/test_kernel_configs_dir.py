"""The kernel benches write tuning tables into the installed package only when asked."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fuselm.bench import kernels, kernels_attention, kernels_gemv
from fuselm.kernels import triton_utils

PACKAGE = Path(triton_utils._CONFIG_DIR)


def _kernels_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    return parser


PARSERS = {"kernels": _kernels_parser, "gemv": kernels_gemv.build_parser,
           "attention": kernels_attention.build_parser}


@pytest.mark.parametrize("bench", PARSERS)
def test_default_is_under_the_output_dir_never_the_package(bench, tmp_path):
    args = PARSERS[bench]().parse_args(["--output-dir", str(tmp_path)])
    target = kernels.resolve_configs_dir(args)
    assert target == tmp_path / "configs"
    assert PACKAGE.resolve() not in (target.resolve(), *target.resolve().parents)


@pytest.mark.parametrize("bench", PARSERS)
def test_configs_dir_package_flag_and_no_write(bench, tmp_path):
    parse = PARSERS[bench]().parse_args
    assert kernels.resolve_configs_dir(parse(["--configs-dir", str(tmp_path / "c")])) \
        == tmp_path / "c"
    assert kernels.resolve_configs_dir(parse(["--write-package-configs"])) == PACKAGE
    assert kernels.resolve_configs_dir(parse(["--no-write-configs"])) is None
    with pytest.raises(SystemExit):  # one destination at a time
        parse(["--configs-dir", str(tmp_path), "--write-package-configs"])


def test_gemv_without_output_dir_and_its_old_no_write_flag():
    parse = kernels_gemv.build_parser().parse_args
    assert kernels.resolve_configs_dir(parse([])) == Path("out") / "configs"
    assert kernels.resolve_configs_dir(parse(["--no-write"])) is None


def test_cpu_run_writes_no_tables_and_note_says_how_to_use_them(tmp_path, capsys):
    before = sorted(p.read_bytes() for p in PACKAGE.glob("*.json"))
    kernels.main(["--preset", "tiny", "--device", "cpu", "--no-compile", "--no-sweep",
                  "--ops", "rms_norm", "--output-dir", str(tmp_path)])
    assert sorted(p.read_bytes() for p in PACKAGE.glob("*.json")) == before
    assert list(tmp_path.glob("kernels-*.json"))
    note = kernels.configs_note(tmp_path / "configs")
    assert "FUSELM_KERNEL_CONFIGS=" in note and "--write-package-configs" in note
    assert "into the package" in kernels.configs_note(PACKAGE)
