"""`llmctl export`: a trained run as a Hugging Face transformers model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import summary
from . import app
from .common import ConfigOpt, ForceOpt


@app.command(
    "export",
    epilog="Example: llmctl export runs/tiny --format hf --out hf/tiny  "
    "(then AutoModelForCausalLM.from_pretrained('hf/tiny'))",
)
def export_cmd(
    run: Annotated[Path, typer.Argument(help="A finished model run (pretrain, sft, reward, dpo, ppo).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (must be new, empty, or a previous export).")],
    format: Annotated[str, typer.Option("--format", "-f", help="Output format: hf (a transformers directory).")] = "hf",
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtype on disk: fp32, bf16 or fp16.")] = "fp32",
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Export a run as LlamaForCausalLM (Qwen3ForCausalLM with QK-norm) + a transformers tokenizer.

    The directory loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained and gives the
    same logits and token ids as llmctl; `llmctl generate DIR` and llmctl.model.hf.load_hf read it back.
    """
    from ..model.hf import ExportConfig, export_hf

    m = export_hf(ExportConfig(run=run, out=out, format=format, dtype=dtype, force=force))
    s = m["stats"]
    summary(
        f"export → {out}",
        [
            ("architecture", s["architecture"]),
            ("parameters", s["parameters"]),
            ("vocab size", s["vocab_size"]),
            ("weights (MB)", s["weights_bytes"] / 1e6),
            ("seconds", s["wall_seconds"]),
        ],
    )
