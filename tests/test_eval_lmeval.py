"""Evidence of correctness: lm-evaluation-harness and llmctl eval agree on the same exported model
and the same local task files (acc, acc_norm, bits-per-byte and every per-item log-likelihood).

lm-eval is a dev-only peer tool with its own venv (it pulls many packages we do not want in the
project's): the test drives ``$LLMCTL_LMEVAL_VENV`` (default ``../peers/lmeval-venv`` beside the
checkout) offline with local task YAMLs, and skips cleanly when that venv is absent. The task is as
small as still proves the point (6 questions: one-token and multi-token choices, a trailing space
that moves, non-ASCII text; 2 documents, one spanning several rolling windows) because lm-eval's
start-up alone takes most of the test's time. Set it up
with ``python3 -m venv ../peers/lmeval-venv && ../peers/lmeval-venv/bin/pip install torch==2.13.0
lm-eval transformers accelerate``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_eval import models, qa_rows, write_task  # noqa: F401  (fixtures)

from llmctl.eval.multiple_choice import context_ids
from llmctl.eval.runner import EvalConfig, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")

VENV = Path(os.environ.get("LLMCTL_LMEVAL_VENV", Path(__file__).resolve().parents[2] / "peers" / "lmeval-venv"))
LM_EVAL = VENV / "bin" / "lm_eval"

MORE = [
    {"q": "The sun rises in the", "opts": ["east", "west", "north side of the valley"], "label": 0},
    {"q": "日本語のテキストです。東京と", "opts": ["大阪", "京都"], "label": 0},
    {"q": "Emoji: 😀 means  ", "opts": ["happy", "sad and tired"], "label": 0},  # trailing spaces move
    {"q": "Pick a word:", "opts": ["the", "and", "in", "my"], "label": 2},  # one-token choices (as in MMLU)
    # longer than the model's 128 positions: both cut each (context + choice) from the left
    {"q": "Tell me more about it. " * 40 + "The sky is", "opts": ["blue", "a bright shade of green today"], "label": 0},
]


def questions() -> list[dict]:
    return qa_rows()[:2] + MORE

MC_YAML = """task: llmctl_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_choice: opts
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

PPL_YAML = """task: llmctl_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def run_lm_eval(hf: Path, tasks_dir: Path, out: Path, task: str, model_args: str = "") -> tuple[dict, list[dict]]:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out / "hf-home"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [str(LM_EVAL), "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32{model_args}",
         "--tasks", task, "--include_path", str(tasks_dir), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
    samples = [json.loads(x) for x in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    return res, samples


@pytest.mark.slow
@pytest.mark.skipif(not LM_EVAL.is_file(), reason=f"lm-eval peer venv absent ({VENV}); see the module docstring")
def test_lm_eval_harness_agrees_on_acc_acc_norm_and_bits_per_byte(models, tmp_path):  # noqa: F811
    _, hf, tok = models
    spec = write_task(tmp_path / "t", questions())
    one = [all(len(c) == 1 for c in context_ids(tok, "Question: " + r["q"] + "\nAnswer:", [" " + o for o in r["opts"]])[1])
           for r in questions()]
    assert any(one) and not all(one)  # both scoring paths are compared
    assert len(tok.encode(questions()[-1]["q"])) > 128  # and left truncation
    docs = tmp_path / "docs.jsonl"
    texts = [Path(__file__).read_text(encoding="utf-8")[:1200] + " Ünïcödé ñ ß — 日本語のテキスト 😀", "Short doc."]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    assert len(tok.encode(texts[0])) > 2 * 128  # several rolling windows, and a short last one
    yd = tmp_path / "yaml"
    yd.mkdir()
    (yd / "llmctl_qa.yaml").write_text(MC_YAML.format(data=spec.parent / "items.jsonl"))
    (yd / "llmctl_ppl.yaml").write_text(PPL_YAML.format(data=docs))
    # both at their defaults for multiple choice: the harness prefixes BOS because llmctl's exported
    # tokenizer adds one, and so does llmctl's eval (--bos); rolling perplexity against the harness
    # without BOS in the text (with it, the harness also scores BOS as the first document token)
    theirs_qa, qa_samples = run_lm_eval(hf, yd, tmp_path / "lmeval-qa", "llmctl_qa")
    theirs_ppl, ppl_samples = run_lm_eval(hf, yd, tmp_path / "lmeval-ppl", "llmctl_ppl", ",add_bos_token=False")
    samples = {"llmctl_qa": qa_samples, "llmctl_ppl": ppl_samples}

    run_eval(EvalConfig(model=str(hf), tasks=[f"jsonl:{spec}", f"ppl:{docs}"], out=str(tmp_path / "ours"),
                        protocol="likelihood"))
    ours = {(r["task"], r["metric"]): r["value"] for r in json.loads((tmp_path / "ours" / "results.json").read_text())["results"]}
    assert ours[("qa", "acc")] == pytest.approx(theirs_qa["acc,none"], abs=1e-4)
    assert ours[("qa", "acc_norm")] == pytest.approx(theirs_qa["acc_norm,none"], abs=1e-4)
    assert ours[("ppl", "bits_per_byte")] == pytest.approx(theirs_ppl["bits_per_byte,none"], abs=1e-4)
    assert ours[("ppl", "byte_perplexity")] == pytest.approx(theirs_ppl["byte_perplexity,none"], rel=1e-4)
    assert ours[("ppl", "word_perplexity")] == pytest.approx(theirs_ppl["word_perplexity,none"], rel=1e-4)

    # stronger than the aggregates: every choice's log-likelihood and every document's
    assert len(samples["llmctl_qa"]) == len(questions()) and len(samples["llmctl_ppl"]) == len(texts)
    items = [json.loads(x) for x in (tmp_path / "ours" / "items-qa.jsonl").read_text().splitlines()]
    for s in samples["llmctl_qa"]:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        assert items[s["doc_id"]]["loglik"] == pytest.approx(lls, abs=1e-4)
    docs_ll = [json.loads(x)["loglik"] for x in (tmp_path / "ours" / "items-ppl.jsonl").read_text().splitlines()]
    for s in samples["llmctl_ppl"]:
        theirs = s["filtered_resps"][0]
        theirs = float(theirs[0] if isinstance(theirs, list) else theirs)
        assert docs_ll[s["doc_id"]] == pytest.approx(theirs, abs=1e-3)
