"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) as pycocoevalcap computes them (CIDEr runs 0-10).

We call pycocoevalcap's scorers one by one instead of `COCOEvalCap.evaluate()`, because that
always builds SPICE, which downloads Stanford models on first use and so fails offline.

Java is optional. BLEU, ROUGE-L and CIDEr are pure Python; the official PTB tokenizer and METEOR
are Java programs. Without Java we tokenize with a pure-Python stand-in (`simple_tokenize`) and
skip METEOR, and the report's `notes` say so, so nobody compares such numbers with published
ones unawares.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from pipeline.core.errors import PipelineError
from pipeline.core.vocab import tokenize
from pipeline.decoder.decode import TOKENIZERS

__all__ = [
    "ALL_METRICS",
    "MetricsReport",
    "fast_scores",
    "java_available",
    "score_captions",
    "simple_tokenize",
]

ALL_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")

SPICE_NOTE = (
    "SPICE left out: pycocoevalcap's SPICE downloads Stanford CoreNLP models on first use, "
    "so it cannot run offline"
)

# METEOR talks to a JVM over pipes; a desynchronised or wedged JVM would block readline()
# forever. A watchdog kills it after this long (plus a per-image allowance), which turns a hang
# into an error. Real runs take seconds to a minute, so this only fires when something is wrong.
METEOR_TIMEOUT_S = 300.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.05



@dataclass
class MetricsReport:
    """Scores keyed "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr" (those computed), plus
    `notes` on anything skipped or approximated and the `tokenizer` used ("ptb" or "simple")."""

    scores: dict[str, float]
    notes: list[str] = field(default_factory=list)
    tokenizer: str = "ptb"

    def as_dict(self) -> dict:
        """Plain JSON-ready dict (floats are Python floats, not numpy scalars)."""
        d = asdict(self)
        d["scores"] = {k: float(v) for k, v in self.scores.items()}
        return d


def java_available() -> bool:
    """True when a `java` on PATH actually starts (a broken JRE or a stub counts as missing)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        proc = subprocess.run([java, "-version"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def simple_tokenize(text: str) -> str:
    """The project's tokenizer (`pipeline.core.vocab.tokenize`), space-joined: a pure-Python stand-in
    for pycocoevalcap's Java PTBTokenizer, close but not identical to it. Needs no nltk data."""
    return " ".join(tokenize(text))


def _check_inputs(references: Mapping, candidates: Mapping) -> None:
    if not candidates:
        raise PipelineError("no captions to score: the candidate set is empty")
    ref_ids, cand_ids = set(references), set(candidates)
    if ref_ids != cand_ids:
        missing = sorted(cand_ids - ref_ids, key=repr)[:5]
        extra = sorted(ref_ids - cand_ids, key=repr)[:5]
        raise PipelineError(
            "candidates and references must cover the same image ids: "
            f"{len(cand_ids - ref_ids)} candidate ids lack references (e.g. {missing}), "
            f"{len(ref_ids - cand_ids)} reference ids lack a candidate (e.g. {extra})"
        )
    for i, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise PipelineError(f"image {i!r}: references must be a non-empty list of strings")
        if not all(isinstance(r, str) for r in refs):
            raise PipelineError(f"image {i!r}: every reference must be a string")
    for i, cand in candidates.items():
        if not isinstance(cand, str):
            raise PipelineError(f"image {i!r}: the candidate must be one string, got {type(cand).__name__}")


def _normalize_metrics(metrics: Sequence[str]) -> list[str]:
    aliases = {m.upper().replace("-", "_"): m for m in ALL_METRICS}
    out = []
    for m in [metrics] if isinstance(metrics, str) else metrics:
        key = str(m).upper().replace("-", "_")
        if key == "SPICE":
            continue  # always left out; the report's SPICE note explains why
        if key not in aliases:
            raise PipelineError(f"unknown metric {m!r}; choose from {', '.join(ALL_METRICS)}")
        if aliases[key] not in out:
            out.append(aliases[key])
    return out


@contextlib.contextmanager
def _stderr_fd_captured() -> Iterator[io.StringIO]:
    """Route file descriptor 2 (which child processes inherit) to a buffer while the block runs.

    The Java PTBTokenizer prints a progress line to stderr on every call; we capture it so the
    caller can drop that line and still show anything else, i.e. real errors.
    """
    captured = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.write(tmp.read().decode(errors="replace"))


def _ptb_tokenize(references: Mapping, candidates: Mapping) -> tuple[dict, dict]:
    """Tokenize references and candidates with one JVM start (the slow part) instead of two."""
    batch: dict = {}
    empty: set = set()  # blank captions would shift PTB's line-per-caption output; skip them
    for i, refs in references.items():
        for j, r in enumerate(refs):
            text = " ".join(r.split())
            if text:
                batch.setdefault(("r", i), []).append({"caption": text})
            else:
                empty.add(("r", i, j))
    for i, c in candidates.items():
        text = " ".join(c.split())
        if text:
            batch[("c", i)] = [{"caption": text}]
    out: dict = {}
    with _stderr_fd_captured() as err:
        try:
            out = PTBTokenizer().tokenize(batch) if batch else {}
        except OSError as e:
            raise PipelineError(f"the Java PTB tokenizer could not run: {e}") from e
    chatter = [l for l in err.getvalue().splitlines() if l and not l.startswith("PTBTokenizer tokenized")]
    if any(len(out.get(k, ())) != len(v) for k, v in batch.items()):
        raise PipelineError("the Java PTB tokenizer returned incomplete output:\n" + "\n".join(chatter))
    if chatter:
        print("\n".join(chatter), file=sys.stderr)

    refs_tok: dict = {}
    for i, refs in references.items():
        toks = iter(out.get(("r", i), ()))
        refs_tok[i] = ["" if ("r", i, j) in empty else next(toks) for j in range(len(refs))]
    cands_tok = {i: out[("c", i)][0] if ("c", i) in out else "" for i in candidates}
    return refs_tok, cands_tok


def _meteor(refs_tok: dict[int, list[str]], cands_tok: dict[int, str]) -> float:
    """Run METEOR and always shut its JVM down, even on error, so no process is left behind.

    Also neutralises two ways pycocoevalcap's wrapper can hang: "|||" in a reference desyncs
    its line protocol (it only strips it from hypotheses), and an error inside compute_score
    leaves its lock held, which would deadlock the wrapper's __del__.
    """
    gts = {i: [r.replace("|||", " ") for r in refs] for i, refs in refs_tok.items()}
    res = {i: [c.replace("|||", " ")] for i, c in cands_tok.items()}
    try:
        scorer = Meteor()
    except OSError as e:
        raise PipelineError(f"METEOR could not start Java: {e}") from e
    proc = scorer.meteor_p
    timed_out = threading.Event()

    def kill_hung() -> None:
        timed_out.set()
        proc.kill()

    watchdog = threading.Timer(METEOR_TIMEOUT_S + METEOR_TIMEOUT_PER_IMAGE_S * len(res), kill_hung)
    watchdog.daemon = True
    watchdog.start()
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except (OSError, ValueError) as e:
        proc.kill()
        detail = (proc.stderr.read() or b"").decode(errors="replace").strip()[-2000:]
        why = "timed out" if timed_out.is_set() else "failed"
        raise PipelineError(f"METEOR (Java) {why}: {detail or e}") from e
    finally:
        watchdog.cancel()
        if scorer.lock.locked():
            scorer.lock.release()
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()


def _python_scores(refs_tok: dict, cands_tok: dict, wanted: Sequence[str]) -> dict[str, float]:
    gts = {i: list(refs) for i, refs in refs_tok.items()}
    res = {i: [c] for i, c in cands_tok.items()}
    scores: dict[str, float] = {}
    # The scorers print (BLEU its length stats); keep that off stdout. Exceptions still surface.
    with contextlib.redirect_stdout(io.StringIO()):
        if "BLEU" in wanted:
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores.update({f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)})
        if "ROUGE_L" in wanted:
            scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in wanted:
            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def score_captions(
    references: Mapping[int, Sequence[str]],
    candidates: Mapping[int, str],
    metrics: Sequence[str] = ALL_METRICS,
    tokenizer: str = "auto",
) -> MetricsReport:
    """Score raw candidate captions against raw references, one candidate per image id.

    `tokenizer`: "ptb" (official Java PTBTokenizer; error without Java), "simple"
    (`simple_tokenize`), or "auto" (ptb when Java runs, else simple). METEOR runs only with Java.
    CIDEr's IDF comes from the references given, so it needs several images to mean anything
    (with one image it is 0).
    """
    if tokenizer not in TOKENIZERS:
        raise PipelineError(f"unknown tokenizer {tokenizer!r}; choose from {', '.join(TOKENIZERS)}")
    _check_inputs(references, candidates)
    wanted = _normalize_metrics(metrics)
    has_java = java_available()
    if tokenizer == "ptb" and not has_java:
        raise PipelineError("tokenizer='ptb' needs Java on PATH; install a JRE or use tokenizer='simple'")

    notes: list[str] = []
    if tokenizer in ("auto", "ptb") and has_java:
        used = "ptb"
        refs_tok, cands_tok = _ptb_tokenize(references, candidates)
        notes.append("tokenizer: ptb (Stanford PTBTokenizer, as in the official COCO evaluation)")
    else:
        used = "simple"
        refs_tok = {i: [simple_tokenize(r) for r in refs] for i, refs in references.items()}
        cands_tok = {i: simple_tokenize(c) for i, c in candidates.items()}
        why = "requested" if tokenizer == "simple" else "Java not found"
        notes.append(f"tokenizer: simple ({why}; lowercase + NLTK Treebank, punctuation dropped; "
                     "close to, but not identical with, the official PTB tokenization)")

    scores = _python_scores(refs_tok, cands_tok, wanted)
    if "METEOR" in wanted:
        if has_java:
            scores["METEOR"] = _meteor(refs_tok, cands_tok)
        else:
            notes.append("METEOR skipped: it runs a Java program and Java was not found on PATH")
    notes.append(SPICE_NOTE)

    order = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    return MetricsReport(scores={k: scores[k] for k in order if k in scores}, notes=notes, tokenizer=used)


def fast_scores(references_tok: Mapping[int, Sequence[str]], candidates_tok: Mapping[int, str]) -> dict:
    """CIDEr and BLEU-4 on already tokenized, space-joined strings; no Java, no tokenizing.

    Meant for the per-epoch validation check during training, where only a cheap signal is
    needed. Tokenize with `simple_tokenize` to get the same numbers as
    `score_captions(..., tokenizer="simple")`.
    """
    _check_inputs(references_tok, candidates_tok)
    scores = _python_scores(references_tok, candidates_tok, ("BLEU", "CIDEr"))
    return {"CIDEr": scores["CIDEr"], "BLEU-4": scores["BLEU-4"]}
