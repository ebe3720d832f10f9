"""`llmctl generate`: sample from a trained model (or an exported transformers directory)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..console import console, summary
from . import app
from .common import ConfigOpt, ForceOpt, SeedOpt

EPILOG = (
    "Examples: llmctl generate runs/tiny --prompt 'To be, or not' --max-new-tokens 60 --temperature 0.8 · "
    "llmctl generate runs/tiny --prompts prompts.jsonl --out completions.jsonl --temperature 0 · "
    "llmctl generate runs/tiny-sft --chat --prompt 'Name three colours.'"
)


@app.command("generate", epilog=EPILOG)
def generate_cmd(
    run: Annotated[Path, typer.Argument(help="A finished model run (pretrain, sft, …) or an exported HF directory.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="One prompt; its completion streams to the terminal.")] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="File of prompts: .txt (one per line) or .jsonl (a 'prompt' field).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write completions as JSON lines here (atomically).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens to generate per prompt.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="Softmax temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k most likely tokens; 0 = off.")] = 50,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus: smallest set of tokens with this probability mass; 1 = off.")] = 0.95,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop when the completion contains this string (repeatable).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts generated together.")] = 16,
    no_bos: Annotated[bool, typer.Option("--no-bos", help="Do not put BOS in front of each prompt.")] = False,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="Also write each token's log-probability to --out.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Prompts are user turns of the model's chat format (llmctl's for sft runs, else the directory's chat_template); replies stop at its end of turn.")] = False,
    system: Annotated[str | None, typer.Option("--system", help="With --chat: a system message before each prompt.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 on CUDA, else fp32), fp32, bf16 or fp16.")] = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Generate text with a KV cache: temperature, top-k, top-p, stop strings, EOS.

    A prompt longer than the model's context is an error (never silently truncated). With
    --temperature 0 decoding is greedy, and batched output equals one-by-one output.
    """
    from ..model.generate import GenerateConfig, run_generate

    cfg = GenerateConfig(
        run=str(run), prompt=prompt, prompts=str(prompts) if prompts else None, out=str(out) if out else None,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop=tuple(stop or ()), seed=seed, batch_size=batch_size, add_bos=not no_bos, logprobs=logprobs,
        chat=chat, system=system, device=device, precision=precision, force=force,
    )
    stream = prompt is not None and out is None
    # plain text continues the prompt, so it is echoed first; a chat reply is printed alone. The
    # echo waits for the first piece, so an error is never printed after a dangling prompt.
    echo = [stream and not chat]

    def write(piece: str) -> None:
        if echo[0]:
            sys.stdout.write(prompt or "")
            echo[0] = False
        sys.stdout.write(piece)
        sys.stdout.flush()

    def on_text(_: int, piece: str) -> None:
        write(piece)

    done, stats, bad = run_generate(cfg, on_text if stream else None)
    if stream:
        write("\n")
        c = done[0]
        console.print(
            f"[dim]{len(c.token_ids)} tokens ({c.finish_reason}) in {stats.seconds:.2f}s · "
            f"{stats.tokens_per_second:,.1f} tokens/s[/]"
        )
        return
    reasons: dict[str, int] = {}
    for c in done:
        reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
    rows: list[tuple[str, object]] = [
        ("prompts", stats.prompts),
        ("prompt tokens", stats.prompt_tokens),
        ("generated tokens", stats.generated_tokens),
        *[(f"finished by {k}", v) for k, v in sorted(reasons.items())],
        *[(f"skipped lines: {k}", v) for k, v in sorted(bad.items())],
        ("seconds", round(stats.seconds, 3)),
        ("tokens/s", round(stats.tokens_per_second, 1)),
    ]
    if out is not None:
        rows.append(("written", str(out)))
    summary(f"generate → {out}" if out else "generate", rows)
