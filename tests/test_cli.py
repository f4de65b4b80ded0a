"""python -m zmzoo bench | eval: the benchmark programs of a source checkout, or a clear message without one."""

from __future__ import annotations

import pytest

from zmzoo import cli


@pytest.mark.parametrize("cmd,module", [("bench", "bench.decode"), ("eval", "bench.quality")])
def test_bench_and_eval_run_the_checkout_programs(cmd, module, capsys):
    assert cli.main([cmd, "--help"]) == 0
    assert f"usage: python -m {module}" in capsys.readouterr().out


@pytest.mark.parametrize("cmd,program", [("bench", "bench/decode.py"), ("eval", "bench/quality.py")])
def test_installed_package_says_the_benchmarks_ship_with_the_checkout(cmd, program, monkeypatch, tmp_path, capsys):
    """An installed (non-editable) zmzoo has no bench/ beside it: here its site-packages is a temp dir."""
    (tmp_path / "zmzoo").mkdir()
    monkeypatch.setattr(cli, "_checkout", lambda: tmp_path)
    assert cli.main([cmd, "--help"]) == 2
    err = capsys.readouterr().err
    assert f"runs {program}, which ships with the source checkout" in err and "not with the installed package" in err


def test_generate_passes_cache_settings_to_load(monkeypatch, capsys):
    """``--cache-setting KEY=VALUE`` (repeatable) reaches ``zmzoo.load`` as a typed keyword, over the preset's; a
    malformed one is refused naming it."""
    import zmzoo

    seen = {}

    def fake_load(name, **kw):
        seen.update(kw)
        raise RuntimeError("stop after load")

    monkeypatch.setattr(zmzoo, "load", fake_load)
    with pytest.raises(RuntimeError, match="stop after load"):
        cli.main(["generate", "--model", "smollm2-135m", "--prompt", "hi", "--preset", "retrieval", "--cache-setting",
                  "lookahead=48", "--cache-setting", "lookahead_prompt_weight=0.5", "--cache-setting", "metric=l2"])
    assert (seen["preset"], seen["lookahead"], seen["lookahead_prompt_weight"], seen["metric"]) == \
        ("retrieval", 48, 0.5, "l2")
    with pytest.raises(SystemExit, match="KEY=VALUE, got 'lookahead'"):
        cli.main(["generate", "--model", "smollm2-135m", "--prompt", "hi", "--cache-setting", "lookahead"])
