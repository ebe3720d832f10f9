import json

import pytest

from llmctl.artifacts import MANIFEST, StageRun, read_manifest, require_artifact
from llmctl.cli.common import parse_shard
from llmctl.errors import UsageError


def _run(out, params, inputs=(), force=False):
    return StageRun.open(out, "demo", params, inputs, force=force)


def test_publish_is_atomic_and_complete(tmp_path):
    out = tmp_path / "art"
    run = _run(out, {"a": 1})
    assert not out.exists(), "nothing at OUT until the stage finishes"
    run.partial("part-0.txt").write_text("x")
    run.commit("part-0.txt")
    m = run.finish({"n": 1})
    assert (out / MANIFEST).is_file() and (out / "part-0.txt").read_text() == "x"
    assert m["stats"]["n"] == 1 and m["params"] == {"a": 1} and m["files"] == ["part-0.txt"]
    assert read_manifest(out)["stage"] == "demo"
    assert not list(tmp_path.glob(".art.tmp-*"))


def test_rerun_is_noop_force_redoes_and_other_params_refused(tmp_path):
    out = tmp_path / "art"
    _run(out, {"a": 1}).finish({})
    again = _run(out, {"a": 1})
    assert again.done and again.manifest["stage"] == "demo"
    with pytest.raises(UsageError, match="--force"):
        _run(out, {"a": 2})
    forced = _run(out, {"a": 2}, force=True)
    assert not forced.done
    forced.finish({})
    assert read_manifest(out)["params"] == {"a": 2}


def test_interrupted_run_resumes_committed_shards_only(tmp_path):
    out = tmp_path / "art"
    run = _run(out, {"a": 1})
    run.partial("s0").write_text("done")
    run.commit("s0")
    run.partial("s1").write_text("half")  # crash before commit
    resumed = _run(out, {"a": 1})
    assert resumed.resumed and resumed.has("s0") and not resumed.has("s1")
    # other params: refused, naming the option, so the interrupted progress is not thrown away unasked
    with pytest.raises(UsageError, match=r"an interrupted demo run with other options \(--a\) is in .*pass --force"):
        _run(out, {"a": 9})
    assert not (tmp_path / ".art.lock").exists()  # the refused run leaves no lock file behind
    assert _run(out, {"a": 1}).has("s0")
    fresh = StageRun.open(out, "demo", {"a": 9}, (), force=True)  # --force: start over
    assert not fresh.resumed and not fresh.has("s0")


def test_input_fingerprints_and_wrong_kind(tmp_path):
    src = tmp_path / "src"
    StageRun.open(src, "extract", {}, ()).finish({})
    out = tmp_path / "out"
    run = StageRun.open(out, "filter", {}, [src])
    assert run.inputs[0]["fingerprint"].startswith("manifest:")
    run.finish({})
    with pytest.raises(UsageError, match="is a 'filter' artifact, but this stage needs extract output"):
        require_artifact(out, ["extract"])
    with pytest.raises(UsageError, match="is an 'extract' artifact, but this stage needs filter output"):
        require_artifact(src, ["filter"])
    with pytest.raises(UsageError, match="holds a 'filter' artifact"):
        StageRun.open(out, "extract", {}, ())


def test_refuses_foreign_dirs_and_newer_formats(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an llmctl artifact"):
        _run(foreign, {})
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / MANIFEST).write_text(json.dumps({"stage": "demo", "format_version": 99}))
    with pytest.raises(UsageError, match="newer llmctl"):
        read_manifest(newer)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_cli_help_and_version(llmctl):
    r = llmctl("--help")
    assert r.code == 0 and "Usage" in r.out
    r = llmctl("--version")
    assert r.code == 0 and r.out.startswith("llmctl ")
    r = llmctl("no-such-stage")
    assert r.code == 2



def test_help_paragraphs_are_reflowed_and_examples_kept():
    """typer's rich mode keeps a docstring's source line breaks after its first paragraph, so a
    narrow terminal showed ragged half-lines: prose paragraphs are joined, indented examples kept."""
    from llmctl.cli import reflow

    doc = """Summary line
    that wraps.

    Prose that
    wraps here.

    Example:

      llmctl x --a 1
      llmctl y
    """
    assert reflow(doc) == "Summary line that wraps.\n\nProse that wraps here.\n\nExample:\n\n  llmctl x --a 1\n  llmctl y"


def test_worker_count_does_not_invalidate_a_finished_or_resumable_run(tmp_path):
    out = tmp_path / "art"
    run = _run(out, {"a": 1, "workers": 1})
    run.partial("s0").write_text("x")
    run.commit("s0")
    resumed = _run(out, {"a": 1, "workers": 2})
    assert resumed.resumed and resumed.has("s0")
    resumed.finish({})
    assert _run(out, {"a": 1, "workers": 4}).done


def test_a_second_writer_of_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    """Two llmctl processes writing one --out would interleave their work directory: the second is
    refused in one line while the first holds the output's lock (held here through another open
    file, as another process would), and the lock goes with the finished run."""
    import fcntl

    out = tmp_path / "art"
    lock = tmp_path / ".art.lock"
    with open(lock, "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match="another llmctl process is writing it now"):
            _run(out, {"a": 1})
    assert not (tmp_path / ".art.tmp-demo").exists()
    run = _run(out, {"a": 1})  # the other writer is gone
    run.finish({})
    assert not lock.exists() and (out / "manifest.json").is_file()


def test_a_finished_run_with_other_options_is_refused_naming_them(tmp_path):
    """A finished artifact is never replaced unasked, and the refusal says which options differ."""
    out = tmp_path / "art"
    _run(out, {"a": 1, "max_page_bytes": 100, "workers": 1}).finish({})
    with pytest.raises(UsageError, match=r"holds a finished \w+ run with other options \(--max-page-bytes\); pass --force"):
        _run(out, {"a": 1, "max_page_bytes": 200, "workers": 1})
