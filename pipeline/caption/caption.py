"""Caption new image files with a trained checkpoint.

The checkpoint records the encoder the decoder was trained on (arch, weights, preprocessing), so
the exact frozen encoder is rebuilt here; images are decoded in DataLoader workers and captioned in
batches. Unreadable images are reported and skipped, never fatal.
"""

from __future__ import annotations

import base64
import glob
import html
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from pipeline.core.errors import PipelineError
from pipeline.core.fileio import read_json, write_json, write_text
from pipeline.core.runtime import choose_device, default_workers
from pipeline.decoder.attributes import accuracy_line, attribute_accuracy, read_truths, wrong_attributes
from pipeline.decoder.checkpoint import load_checkpoint, restore_decoder
from pipeline.decoder.decode import DecodeConfig, decode
from pipeline.encoder.compiled import maybe_compile
from pipeline.encoder.encoder import encode_images, load_encoder
from pipeline.encoder.images import IMAGE_EXTENSIONS, Preprocess, image_batches
from pipeline.encoder.onnx_runtime import maybe_onnx


@dataclass
class Captioned:
    path: str
    caption: str = ""
    logprob: float = 0.0
    error: str = ""
    # with attention=True: (word, its G*G region weights, row-major) per word, and the share of the image's
    # shorter side that the encoder's centre crop kept (crop / resize), to draw the maps where the CNN looked
    attention: list[tuple[str, list[float]]] | None = None
    view: float = 1.0


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (their images, sorted, not recursive) and glob patterns -> a list of paths.

    A folder's images are its entries named with a suffix of `IMAGE_EXTENSIONS`: the one list of what the
    decoder (images.Preprocess, extract's too) reads on this machine, .avif included where Pillow has it.

    Every entry named like an image is kept, whatever it turns out to be (a sub-folder called x.jpg, a
    symlink loop, a broken link): decoding then lists it as unreadable with its reason, so no input
    vanishes from the count."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(str(p) for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif os.path.lexists(item):
            paths.append(item)
        elif glob.has_magic(item):
            paths += sorted(p for p in glob.glob(item, recursive=True)
                            if os.path.isfile(p) or Path(p).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise PipelineError(f"{item}: no such file, folder or matching pattern")
    if not paths:
        raise PipelineError(f"no images found in {' '.join(inputs)}")
    return paths


def caption_images(checkpoint: str | os.PathLike, inputs: list[str], cfg: DecodeConfig | None = None,
                   batch_size: int = 32, workers: int | None = None,
                   encoder_weights: str | None = None, attention: bool = False) -> list[Captioned]:
    """Caption image files, folders or globs with a checkpoint: rebuilds its encoder and decodes with `cfg`.

    Returns one Captioned per input file, in order; unreadable images carry their reason in `error`
    instead of a caption. Refuses (PipelineError) a missing or foreign checkpoint, inputs that match
    nothing, and an encoder weights file that is missing or not the one the features were made with.
    `attention`: also record where an attention decoder looked for each word (refused for Show-and-Tell).
    """
    cfg = cfg or DecodeConfig()
    cfg.check()
    ckpt = load_checkpoint(checkpoint)
    dev = choose_device(cfg.device)
    model, vocab, spec = restore_decoder(ckpt, dev)
    if attention and not hasattr(model, "attention"):
        raise PipelineError(f"--attention draws where an attention decoder looks, but {checkpoint} holds a "
                            f"{model.cfg.decoder} decoder: train one with train.decoder attend")
    paths = expand_inputs(inputs)
    batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
    images = image_batches(paths, Preprocess.of(spec), batches, dev, default_workers(dev) if workers is None
                           else workers)  # decoding starts while the encoder is built
    encoder = load_encoder(spec, dev, encoder_weights, grid_size=model.cfg.grid_size)  # the grid only for attend
    encoder, compiled, _ = maybe_compile(encoder, "auto", dev, len(paths), batch_size)  # as extract's auto decides
    encoder, _, _ = maybe_onnx(encoder, "auto", dev, len(paths), compiled)
    out = [Captioned(p) for p in paths]
    banned = (vocab.pad_id, vocab.start_id, vocab.unk_id)
    for rows, feats, errs in encode_images(encoder, images, dev):
        ok = [j for j, e in enumerate(errs) if not e]
        for j, e in enumerate(errs):
            out[rows[j]].error = e
        if not ok:
            continue
        feats = torch.from_numpy(feats[ok]).to(dev)  # (b, D) or (b, 1 + R, D)
        hyps = decode(model, feats, beam_size=cfg.beam_size, max_length=cfg.max_length,
                      start_id=vocab.start_id, end_id=vocab.end_id, length_penalty=cfg.length_penalty, banned_ids=banned)
        maps = attention_maps(model, feats, hyps, vocab) if attention else [None] * len(hyps)
        for j, h, m in zip(ok, hyps, maps):
            r = out[rows[j]]
            r.caption, r.logprob, r.attention, r.view = vocab.decode(h.tokens), float(h.logprob), m, spec.crop / spec.resize
    return out


def attention_maps(model, feats: torch.Tensor, hyps, vocab) -> list[list[tuple[str, list[float]]]]:
    """(word, region weights) of every word of each hypothesis: the decoder re-reads its own caption
    (teacher-forced, eval mode: the same steps decoding took) and reports its attention at each."""
    longest = max(len(h.tokens) for h in hyps)
    inputs = torch.full((len(hyps), longest + 1), vocab.pad_id, dtype=torch.long)  # <start> w1 .. wn, padded
    inputs[:, 0] = vocab.start_id
    for b, h in enumerate(hyps):
        inputs[b, 1:len(h.tokens) + 1] = torch.tensor(h.tokens, dtype=torch.long)
    alpha = model.attention(feats, inputs.to(feats.device)).cpu()  # (b, T, R): row t is behind word t+1
    return [[(vocab.tokens[w], [round(float(a), 4) for a in alpha[b, t]]) for t, w in enumerate(h.tokens)]
            for b, h in enumerate(hyps)]


def image_id_of(path: str, fallback: int) -> int:
    """COCO-style ids from file names like COCO_val2014_000000391895.jpg; else the running index."""
    digits = re.findall(r"\d+", Path(path).stem)
    return int(digits[-1]) if digits else fallback


def result_ids(results: list[Captioned]) -> tuple[list[int], str]:
    """(the image_id of each captioned result, in order; a note, "" when none is needed).

    Ids come from the file names (`image_id_of`: the last run of digits, so COCO's own files keep their
    COCO ids and the JSON can be scored against COCO's annotations), as long as that gives every captioned
    image its own id. When two would share one (day1/IMG_0001.jpg and day2/IMG_0001.jpg, the same file
    twice, a name without digits whose position equals another's digits), every image is numbered by its
    position in the input list instead (0, 1, ...: the row of `results`), and the note says so."""
    rows = [i for i, r in enumerate(results) if not r.error]
    ids = [image_id_of(results[i].path, i) for i in rows]
    if len(set(ids)) == len(ids):
        return ids, ""
    first: dict[int, str] = {}
    for i, k in zip(rows, ids):
        if k in first:
            return rows, (f"{first[k]} and {results[i].path} would both get image id {k} from their names: the "
                          f"results' images are numbered by their position in the input list instead (0, 1, ...; "
                          f"file_name says which is which)")
        first[k] = results[i].path
    raise AssertionError("unreachable: the ids were not unique")


def write_results_json(results: list[Captioned], path: str | os.PathLike) -> str:
    """COCO results format, plus the file name so arbitrary images stay identifiable; ids unique (see
    `result_ids`). Returns the note about the ids ("" when they come from the file names)."""
    ids, note = result_ids(results)
    write_json(path, [{"image_id": k, "caption": r.caption, "file_name": r.path}
                      for k, r in zip(ids, (r for r in results if not r.error))])
    return note


def _thumbnail(path: str, size: int = 256) -> str:
    img = Preprocess().load(path)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _attention_strip(r: Captioned, size: int = 72) -> str:
    """Where the decoder looked for each word: the encoder's centre crop once per word, the regions it
    weighed least darkened (the usual view of a soft-attention captioner); "" without attention maps."""
    if not r.attention:
        return ""
    img = ImageOps.fit(Preprocess().load(r.path), (size, size), Image.Resampling.BICUBIC, bleed=(1 - r.view) / 2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    src = base64.b64encode(buf.getvalue()).decode("ascii")
    g = max(1, round(len(r.attention[0][1]) ** 0.5))
    tiles = []
    for word, weights in r.attention:
        top = max(weights) or 1.0
        cells = "".join(f'<rect x="{i % g}" y="{i // g}" width="1" height="1" fill-opacity="{0.8 * (1 - w / top):.2f}"/>'
                        for i, w in enumerate(weights))
        tiles.append(f'<span class="att"><svg viewBox="0 0 {g} {g}" width="{size}" height="{size}">'
                     f'<image href="data:image/jpeg;base64,{src}" width="{g}" height="{g}"/>{cells}</svg>'
                     f'<br>{html.escape(word)}</span>')
    return f'<div class="atts">{"".join(tiles)}</div>'


def read_references(path: str | os.PathLike, results: list[Captioned]) -> dict[str, list[str]]:
    """{image path: its captions} from a COCO captions file, for the results whose path ends with one of its
    images' file_name (the demo's annotations/captions_test.json for data/demo/test/*.jpg)."""
    try:
        coco = read_json(path)
        names = {im["id"]: im["file_name"] for im in coco["images"]}
        by_name: dict[str, list[str]] = {}
        for a in coco["annotations"]:
            by_name.setdefault(names[a["image_id"]], []).append(a["caption"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"--references {path}: not a readable COCO captions file ({e})") from None
    by_base: dict[str, list[str]] = {}
    for n in by_name:
        by_base.setdefault(Path(n).name, []).append(n)
    out = {}
    for r in results:
        p = Path(r.path).as_posix()
        match = [n for n in by_base.get(Path(p).name, []) if p == n or p.endswith("/" + n)]
        if match:
            out[r.path] = by_name[match[0]]
    return out


def attribute_report(results: list[Captioned]) -> tuple[str, dict[str, list[str]]]:
    """For images whose folder says their attributes (the demo's): (accuracy_line, {path: what its caption
    gets wrong or leaves out}); ("", {}) for other images."""
    captioned = [r for r in results if not r.error]
    truths = read_truths(r.path for r in captioned)
    if not truths:
        return "", {}
    captions = {r.path: r.caption for r in captioned if r.path in truths}
    misses = {p: wrong_attributes(c, truths[p]) for p, c in captions.items()}
    return accuracy_line(attribute_accuracy(captions, truths)), misses


def write_html(results: list[Captioned], path: str | os.PathLike, title: str = "Generated captions",
               references: dict[str, list[str]] | None = None, summary: str = "",
               misses: dict[str, list[str]] | None = None) -> None:
    """A self-contained page (thumbnails embedded) of images with their captions; `references` (path -> human
    captions) shows them under each caption, `misses` (path -> what the caption gets wrong) in red,
    `summary` (plain text) above the grid."""
    references, misses = references or {}, misses or {}
    cards = []
    for r in results:
        name = html.escape(os.path.basename(r.path))
        if r.error:
            cards.append(f'<figure class="bad"><figcaption><b>{name}</b><br>unreadable: {html.escape(r.error)}</figcaption></figure>')
            continue
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in references.get(r.path, []))
        miss = "<br>".join(html.escape(m) for m in misses.get(r.path, []))
        cards.append(f'<figure><img src="data:image/jpeg;base64,{_thumbnail(r.path)}" alt="{name}">'
                     f'<figcaption><b>{html.escape(r.caption)}</b><br><small>{name}</small>'
                     + (f'<br><small class="bad">{miss}</small>' if miss else "")
                     + (f'<ul class="refs">{refs}</ul>' if refs else "") + _attention_strip(r) + '</figcaption></figure>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} .grid{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{width:260px;margin:0}} img{{max-width:256px;max-height:256px;display:block}}
figcaption{{font-size:14px;margin-top:.3em}} .bad{{color:#a00}}
.refs{{color:#555;font-size:12px;padding-left:1.2em;margin:.3em 0}} pre{{font-size:13px}}
.atts{{display:flex;flex-wrap:wrap;gap:2px}} .att{{font-size:11px;text-align:center}}</style></head>
<body><h1>{html.escape(title)}</h1>{f"<pre>{html.escape(summary)}</pre>" if summary else ""}<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    write_text(path, page)
