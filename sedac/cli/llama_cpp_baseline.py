"""The optional llama.cpp baseline of `sedac-run bench --precisions ... --llama-cpp DIR`.

llama.cpp's own benchmark tool (llama-bench, from a llama.cpp build's bin directory: it builds from source,
so it is never a dependency) measures batch-1 decode (tg: generating N tokens) and prefill (pp: a prompt of N
tokens) on the same GGUF our engines were built from, plus its conversions by llama-quantize (F32, BF16,
Q8_0; kept beside the report), with the same thread count, in the same run as ours, its batch-1 decode
runs interleaved with ours.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

CONVERSIONS = ("F32", "BF16", "Q8_0")  # llama.cpp's fastest formats on CPU besides the file's own
REPETITIONS = 3


class LlamaCppBaseline:
    """llama-bench on the source file and each conversion, with our thread count. Batch-1 decode is
    measured a round at a time (`decode_round`: one llama-bench run per format), so a caller can
    interleave the rounds with its own runs and both sides share the VM's drifts in memory bandwidth."""

    def __init__(self, bin_dir: str, gguf: Path, work_dir: Path, threads: int):
        self.bench, quantize = (_tool(bin_dir, name) for name in ("llama-bench", "llama-quantize"))
        self.formats, self.threads = _formats(quantize, gguf, work_dir), threads
        self.decode: dict[str, list[float]] = {fmt: [] for fmt in self.formats}  # tok/s per round

    def decode_round(self, output_len: int) -> None:
        for fmt, path in self.formats.items():
            self.decode[fmt].append(self._bench(path, 0, output_len, 1)["decode"])

    def rows(self, prefill_len: int) -> dict[str, dict]:
        """{"llama.cpp FORMAT": {batch-1 decode tok/s (mean of the rounds), prefill tok/s, file MB}}."""
        return {
            f"llama.cpp {fmt}": {
                "batch1_decode_tok_s": round(sum(self.decode[fmt]) / len(self.decode[fmt]), 1),
                f"prefill{prefill_len}_tok_s": self._bench(path, prefill_len, 0, REPETITIONS)["prefill"],
                "engine_mb": round(path.stat().st_size / 2**20, 1),
            }
            for fmt, path in self.formats.items()
        }

    def _bench(self, model: Path, prefill_len: int, output_len: int, repetitions: int) -> dict[str, float]:
        command = [str(self.bench), "-m", str(model), "-t", str(self.threads), "-p", str(prefill_len)]
        command += ["-n", str(output_len), "-r", str(repetitions), "-o", "json"]
        speeds = {}
        for test in json.loads(_run(command, f"llama-bench on {model.name}")):
            speeds["prefill" if test["n_prompt"] else "decode"] = round(test["avg_ts"], 1)
        return speeds


def _tool(bin_dir: str, name: str) -> Path:
    path = Path(bin_dir) / name
    if not path.is_file():
        raise ValueError(f"--llama-cpp: no {name} in {bin_dir} (give a llama.cpp build's bin directory)")
    return path


def _formats(quantize: Path, gguf: Path, work_dir: Path) -> dict[str, Path]:
    """The source file under its own type's name, and each conversion (made once, then reused)."""
    files = {_file_type(gguf): gguf}
    work_dir.mkdir(parents=True, exist_ok=True)
    for fmt in CONVERSIONS:
        if fmt == _file_type(gguf):
            continue
        target = work_dir / f"{gguf.stem}.{fmt}.gguf"
        if not target.is_file():
            _run([str(quantize), "--allow-requantize", str(gguf), str(target), fmt], f"llama-quantize to {fmt}")
        files[fmt] = target
    return files


def _file_type(gguf: Path) -> str:
    """The file's llama.cpp type (Q4_1, F32, ...) from its metadata."""
    import gguf as gguf_lib

    field = gguf_lib.GGUFReader(str(gguf)).fields.get("general.file_type")
    if field is None:
        return "source"
    return gguf_lib.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_").replace("ALL_", "")


def _run(command: list[str], what: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ValueError(f"{what} failed (exit {done.returncode}): {tail[0][:200]}")
    return done.stdout
