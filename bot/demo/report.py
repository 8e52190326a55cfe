"""The demo's HTML report: one page a newcomer can open, with every file next to it.

Layout: `<report dir>/index.html`, images under `images/`, the exported LoRA files under
`lora/`, the chat's own attachments under `chat/`. Everything is linked relatively, so
the folder can be zipped and sent on.
"""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from bot.demo.transcript import Entry

REPORT_NAME = "index.html"

REAL_WEIGHTS_HELP = (
    "Point Atelier at real weights with ATELIER_BASE_MODELS, a JSON object of names to "
    'models, e.g. ATELIER_BASE_MODELS=\'{"sd15": "/models/sd15-diffusers"}\' (a diffusers '
    'folder), {"sdxl": {"source": "/models/sdxl.safetensors", "config": '
    '"/models/sdxl-config"}} (a single checkpoint with its config folder) or a hub id '
    "already in the local Hugging Face cache; then `/style create NAME TRIGGER style sd15`."
)
TOY_NOTE = (
    "toy-sd15 is Atelier's own small Stable Diffusion 1.5-layout model (2.5M-parameter UNet), "
    "pretrained by Atelier's own command on a toy world of coloured shapes on plain "
    "backgrounds at 64 px. It draws what it is asked in that world, so a learned style can "
    "be seen and measured exactly; it knows nothing else. For real pictures, point Atelier "
    "at real weights."
)


@dataclass(frozen=True)
class ReportImage:
    filename: str
    data: bytes
    seed: int
    parameters: str  # the PNG's own A1111 `parameters` chunk, verbatim


@dataclass(frozen=True)
class ReportGeneration:
    job_id: int
    prompt: str
    settings: str  # "20 steps · CFG 7 · 128x128 · euler_a · tiny-sd15 · loras stripes:1"
    compare: bool
    images: tuple[ReportImage, ...]


@dataclass(frozen=True)
class ReportTraining:
    style: str
    trigger: str
    version: int
    steps: int
    base_val_loss: float | None
    val_loss: float | None
    seconds: float
    loss_curve: bytes | None = None
    grid: bytes | None = None
    # False: too few images to hold any out, so validation ran on the training images.
    held_out: bool = True

    @property
    def loss_label(self) -> str:
        return "held-out loss" if self.held_out else "loss on the training images"


@dataclass(frozen=True)
class ReportFile:
    path: Path  # where the chat delivered it
    name: str  # the name it is offered under
    note: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    """The style scored with the toy world's metrics on held-out prompts (shares of images)."""

    prompts: list[str]
    base: dict[str, float]  # the base model, no LoRA
    with_trigger: dict[str, float]  # the LoRA on, trigger in the prompt
    without_trigger: dict[str, float]  # the LoRA on, no trigger word in the prompt

    def rows(self) -> list[tuple[str, str]]:
        b, w, n = self.base, self.with_trigger, self.without_trigger
        return [
            ("Base model: shape, colour and background all right", f"{b['adherence']:.0%}"),
            (
                "Stripes show with the trigger (base → trained)",
                f"{b['style_shows']:.0%} → {w['style_shows']:.0%}",
            ),
            (
                "Stripe score with the trigger (base → trained)",
                f"{b['style_score']:.3f} → {w['style_score']:.3f}",
            ),
            ("Stripes show without the trigger, LoRA on (a leak)", f"{n['style_shows']:.0%}"),
            ("Colour right with the style on", f"{w['colour']:.0%}"),
            ("All three right with the style on", f"{w['adherence']:.0%}"),
        ]

    def text(self) -> str:
        count = int(self.with_trigger["images"])
        head = f"Measured on {len(self.prompts)} held-out prompts, {count} images each way:"
        return "\n".join([head, *(f"  {label}: {value}" for label, value in self.rows())])


@dataclass(frozen=True)
class DemoReport:
    data_dir: Path
    wall_s: float
    reused: list[str]
    transcript: Sequence[Entry]
    training: ReportTraining | None
    generations: Sequence[ReportGeneration]
    exports: Sequence[ReportFile]
    measurement: Measurement | None = None


def write_report(report: DemoReport, folder: Path) -> Path:
    """Write index.html and its files into `folder` (replacing an earlier report there)."""
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("images", "lora", "chat"):
        (folder / sub).mkdir(parents=True)
    page = _Page(folder)
    path = folder / REPORT_NAME
    path.write_text(page.render(report), encoding="utf-8")
    return path


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _chat_text(text: str) -> str:
    """Chat markdown (bold, code) to HTML; everything else escaped."""
    out = _esc(text)
    out = _BOLD.sub(r"<b>\1</b>", out)
    out = _CODE.sub(r"<code>\1</code>", out)
    return out.replace("\n", "<br>")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


class _Page:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._names: set[str] = set()
        self._copied: dict[Path, str] = {}  # a file shown twice is copied once

    def _unique(self, sub: str, name: str) -> str:
        stem, dot, ext = name.rpartition(".")
        candidate, n = name, 1
        while f"{sub}/{candidate}" in self._names:
            n += 1
            candidate = f"{stem}-{n}.{ext}" if dot else f"{name}-{n}"
        self._names.add(f"{sub}/{candidate}")
        return f"{sub}/{candidate}"

    def put_bytes(self, sub: str, name: str, data: bytes) -> str:
        rel = self._unique(sub, name)
        (self.folder / rel).write_bytes(data)
        return rel

    def put_file(self, sub: str, source: Path, name: str | None = None) -> str | None:
        if source in self._copied:
            return self._copied[source]
        if not source.is_file():
            return None
        rel = self._unique(sub, name or source.name)
        shutil.copyfile(source, self.folder / rel)
        self._copied[source] = rel
        return rel

    # -- sections ------------------------------------------------------------------------

    def render(self, r: DemoReport) -> str:
        body = [
            self._summary(r),
            self._measurement(r.measurement),
            self._generations(r.generations),
            self._training(r.training),
            self._exports(r.exports),
            self._transcript(r.transcript),
        ]
        return _TEMPLATE.format(css=_CSS, body="\n".join(body))

    def _summary(self, r: DemoReport) -> str:
        t = r.training
        lines = ["<h1>Atelier demo</h1>"]
        if t is not None:
            trained = f"trained <b>{_esc(t.style)}</b> v{t.version} in {t.steps} steps"
            if t.val_loss is not None and t.base_val_loss:
                better = 1 - t.val_loss / t.base_val_loss
                losses = f"{t.base_val_loss:.3f} → {t.val_loss:.3f}"
                trained += f" ({t.loss_label} {losses}, {better:.0%} lower)"
            lines.append(
                "<p class=lede>A team's whole story in one chat, on this machine's CPU: "
                f"a style with the trigger word <code>{_esc(t.trigger)}</code>, 12 reference "
                f"images of striped shapes, an art lead's ✅ on the review sheet, {trained}, "
                "images generated with the trigger word, a base-vs-style comparison, the "
                "style measured on prompts no reference shows, and the exported LoRA. "
                f"Wall time {_duration(r.wall_s)}.</p>"
            )
        lines.append(f"<p class=hint>Data folder: <code>{_esc(str(r.data_dir))}</code></p>")
        if r.reused:
            items = "".join(f"<li>{_esc(x)}</li>" for x in r.reused)
            lines.append(f"<p>Reused from an earlier run:</p><ul class=reused>{items}</ul>")
        lines.append(
            f"<div class=notice><b>About the model.</b> {_esc(TOY_NOTE)}<br>"
            f"{_chat_text(REAL_WEIGHTS_HELP)}</div>"
        )
        return "\n".join(lines)

    def _measurement(self, m: Measurement | None) -> str:
        if m is None:
            return ""
        rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in m.rows())
        prompts = ", ".join(f"“{_esc(p)}”" for p in m.prompts)
        return (
            "<h2>What the LoRA learned</h2>"
            f"<table class=metrics>{rows}</table>"
            f"<p class=hint>Scored with the toy world's exact metrics on {len(m.prompts)} "
            f"prompts no reference shows ({prompts}), {int(m.base['images'])} images each: "
            "with the trigger (base and style on the same seeds), and with the LoRA on but no "
            "trigger word in the prompt.</p>"
        )

    def _figure(self, image: ReportImage, css: str = "image") -> str:
        rel = self.put_bytes("images", image.filename, image.data)
        return (
            f'<figure class="{css}" data-seed="{image.seed}">'
            f'<a href="{_esc(rel)}"><img src="{_esc(rel)}" alt="seed {image.seed}"></a>'
            f"<figcaption><b>Seed {image.seed}</b>"
            f'<pre class="params">{_esc(image.parameters)}</pre></figcaption></figure>'
        )

    def _generations(self, generations: Sequence[ReportGeneration]) -> str:
        parts: list[str] = []
        for g in generations:
            title = "Base vs style, same seed" if g.compare else "Generated with the trigger word"
            note = (
                "<p class=hint>Left: the base model alone; right: with the trained style.</p>"
                if g.compare
                else ""
            )
            css = "image wide" if g.compare else "image"
            figures = "".join(self._figure(i, css) for i in g.images)
            parts.append(
                f'<section class=generation data-job="{g.job_id}"><h2>{title}</h2>'
                f"<p><code>/imagine {_esc(g.prompt)}</code> → job #{g.job_id}<br>"
                f"<span class=hint>{_esc(g.settings)}</span></p>{note}"
                f"<div class=gallery>{figures}</div></section>"
            )
        return "\n".join(parts)

    def _training(self, t: ReportTraining | None) -> str:
        if t is None:
            return ""
        rows = [("steps", str(t.steps)), ("time", _duration(t.seconds))]
        if t.base_val_loss is not None:
            rows.append((f"{t.loss_label}, base model", f"{t.base_val_loss:.4f}"))
        if t.val_loss is not None:
            rows.append((f"{t.loss_label}, trained", f"{t.val_loss:.4f}"))
        table = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
        pictures = ""
        if t.loss_curve:
            rel = self.put_bytes("images", "loss-curve.png", t.loss_curve)
            pictures += f'<img class=curve src="{rel}" alt="loss curve">'
        if t.grid:
            rel = self.put_bytes("images", "training-base-vs-trained.png", t.grid)
            pictures += (
                f'<figure class=grid><img src="{rel}" alt="base vs trained samples">'
                "<figcaption>Samples at the end of training, fixed seeds: base model "
                "(top) and trained (bottom).</figcaption></figure>"
            )
        return (
            f"<section class=training><h2>Training {_esc(t.style)} v{t.version}</h2>"
            f"<div class=row><table>{table}</table>{pictures}</div></section>"
        )

    def _exports(self, exports: Sequence[ReportFile]) -> str:
        if not exports:
            return ""
        items: list[str] = []
        for f in exports:
            rel = self.put_file("lora", f.path, f.name)
            if rel is None:
                continue
            meta = "".join(
                f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in f.metadata.items()
            )
            table = f"<table class=meta>{meta}</table>" if meta else ""
            items.append(
                f'<li><a class=lora href="{_esc(rel)}">{_esc(f.name)}</a> '
                f"<span class=hint>{_esc(f.note)}</span>{table}</li>"
            )
        return f"<section class=exports><h2>Exported LoRA</h2><ul>{''.join(items)}</ul></section>"

    def _transcript(self, entries: Sequence[Entry]) -> str:
        rows: list[str] = []
        for e in entries:
            if e.kind == "command":
                rows.append(self._command(e))
            elif e.kind == "note":
                rows.append(f"<div class=note>{_chat_text(e.text)}</div>")
            elif e.kind == "console":
                rows.append(f"<div class=console>{_esc(e.text)}</div>")
            else:
                rows.append(self._message(e))
        return (
            "<section class=transcript><h2>The conversation</h2>"
            "<p class=hint>As the console adapter showed it; Discord and Slack show the same "
            "messages. Edited messages show their last version.</p>"
            f"{''.join(rows)}</section>"
        )

    @staticmethod
    def _command(e: Entry) -> str:
        who = f"<span class=who>{_esc(e.who)}</span>"
        react = _REACT.match(e.text)
        if react:
            said = f"reacted {_esc(react.group(2))} on [{react.group(1)}]"
        else:
            said = f"<code>{_esc(e.text)}</code>"
        return f'<div class="msg person">{who}{said}</div>'

    def _message(self, e: Entry) -> str:
        tags = []
        if e.thread is not None:
            tags.append(f"in the thread of [{e.thread}]")
        if e.edited:
            tags.append("edited")
        if e.private:
            tags.append("only you")
        tag = f" <span class=hint>({_esc(', '.join(tags))})</span>" if tags else ""
        files: list[str] = []
        for path in e.files:
            rel = self.put_file("chat", path)
            if rel is None:
                continue
            if path.suffix.lower() == ".png":
                size = "thumb large" if _width(path) >= 400 else "thumb"
                files.append(f'<a href="{_esc(rel)}"><img class="{size}" src="{_esc(rel)}"></a>')
            else:
                files.append(f'<a class=file href="{_esc(rel)}">📎 {_esc(path.name)}</a>')
        attached = f"<div class=files>{''.join(files)}</div>" if files else ""
        return (
            f'<div class="msg bot"><div class=text><span class=who>[{e.number}] atelier</span>'
            f"{tag}<div>{_chat_text(e.text)}</div></div>{attached}</div>"
        )


_REACT = re.compile(r"^react\s+(\d+)\s+(\S+)$")


def _width(path: Path) -> int:
    try:
        with Image.open(path) as image:
            return int(image.width)
    except (OSError, ValueError):
        return 0


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Atelier demo report</title>
<style>{css}</style>
</head>
<body>
{body}
</body>
</html>
"""

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
  max-width: 1100px; padding: 24px 32px; color: #1d2330; background: #fafafa; }
h1 { margin: 0 0 8px; font-size: 28px; }
h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #dde; padding-bottom: 4px; }
.lede { font-size: 16px; }
.notice { background: #fff6db; border: 1px solid #e8cf7a; border-radius: 6px; padding: 10px 14px; }
.hint { color: #667; font-size: 13px; }
code { background: #eef0f5; padding: 1px 4px; border-radius: 3px; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; }
figure.image { width: 190px; }
figure.image img { width: 190px; height: 190px; image-rendering: pixelated; border-radius: 4px;
  display: block; }
figure.wide { width: 390px; }
figure.wide img { width: 390px; height: auto; aspect-ratio: 2 / 1; }
figcaption { font-size: 13px; margin-top: 4px; }
pre.params { white-space: pre-wrap; word-break: break-word; font-size: 10.5px; color: #556;
  background: #f0f1f4; padding: 4px 6px; border-radius: 3px; margin: 4px 0 0; }
.row { display: flex; gap: 20px; align-items: flex-start; flex-wrap: wrap; }
table { border-collapse: collapse; font-size: 14px; }
th { text-align: left; font-weight: 500; color: #556; padding: 2px 12px 2px 0; }
img.curve { width: 460px; border: 1px solid #dde; border-radius: 4px; }
figure.grid img { width: 196px; image-rendering: pixelated; }
figure.grid figcaption { width: 200px; }
.exports li { margin-bottom: 8px; }
table.meta { margin-top: 4px; font-size: 12px; }
.transcript .msg { margin: 6px 0; padding: 6px 10px; border-radius: 6px; }
.msg.bot { display: flex; justify-content: space-between; gap: 14px; }
.msg.bot .files { flex: none; max-width: 420px; }
a.file { display: block; margin: 2px 0; }
.msg.person { background: #e7efff; }
.msg.bot { background: #fff; border: 1px solid #e4e6ec; }
.who { font-weight: 600; margin-right: 8px; }
.note { color: #556; font-style: italic; margin: 14px 0 4px; }
.console { color: #667; font-family: monospace; font-size: 13px; margin: 4px 10px; }
img.thumb { width: 96px; margin: 4px 4px 0 0; border-radius: 3px; image-rendering: pixelated; }
img.thumb.large { width: 320px; image-rendering: auto; }
ul.reused { margin-top: 0; }
"""
