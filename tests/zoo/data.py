"""Real calibration and evaluation data for the zoo, made on the machine and cached as .npz.

- speech: sentences spoken by espeak-ng (Debian package) in several voices, resampled to 16 kHz,
  with silences between utterances and a little noise, cut into the 512-sample chunks silero-vad
  takes (the ONNX files also take the previous chunk's last 64 samples in front: 576). Several
  streams side by side, as a server runs them: `sequence` holds each chunk's stream id, chunks of
  one stream are consecutive. Labels: 1 where the CLEAN signal's chunk energy says speech.
- text crops (recognizer, 3x48x320) and text pages (detector, 3x320x320) rendered with PIL in the
  DejaVu fonts (Debian fonts-dejavu-core); labels: the text as indices into the model's own CTC
  character list, and the pixel mask of the text boxes.
- face / non-face crops (MTCNN ONet 48, RNet 24, PNet 12) from the images scikit-image bundles:
  the 100 LFW faces of `skimage.data.lfw_subset()` (and their mirror images) against its 100
  non-faces and crops of skimage's scenes and textures.

Every builder is deterministic (seeded) and cached under <zoo cache>/data/<name>-<hash>.npz, where
the hash covers the builder's parameters and this file's source: a change here rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from .wheels import asset, cache_root

SR = 16000
CHUNK = 512
CONTEXT = 64
STATE_SIZE = 128

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A model repository is the one contract between the parts.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her.",
    "Turn the volume down before the meeting starts at nine.",
    "Every variant is validated against the reference on held out data.",
    "Wednesday morning the train to Boston left twenty minutes late.",
    "How much wood would a woodchuck chuck if it could chuck wood?",
    "Numbers such as forty two and seventeen are read aloud.",
    "The weather tomorrow will be cloudy with a chance of rain.",
    "Open the window, the room is getting very warm.",
    "My favourite colours are green, orange and deep purple.",
    "Speech recognition works better with a clean microphone signal.",
    "The library closes at eight on Fridays and at noon on Sundays.",
]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-us+m3", "en-gb+f2"]


def _key(name: str, params: dict) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps({"name": name, **params}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cached(name: str, params: dict, build) -> Path:
    """The .npz made by `build(**params) -> dict[str, ndarray]`, built once per (name, params, code)."""
    path = cache_root() / "data" / f"{name}-{_key(name, params)}.npz"
    if not path.exists():
        arrays = build(**params)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
            np.savez(f, **arrays)
        Path(f.name).replace(path)
    return path


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------
# speech (silero-vad)


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance as float32 at 16 kHz."""
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng not found: install the Debian package (apt-get install -y espeak-ng)")
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "u.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True, timeout=60)
        with wave.open(str(wav)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    x = pcm.astype(np.float32) / 32768.0
    g = np.gcd(SR, rate)
    return resample_poly(x, SR // g, rate // g).astype(np.float32)


def speech_streams(streams: int, seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy [streams, samples], clean [streams, samples]): utterances between silences."""
    rng = np.random.default_rng(seed)
    total = int(seconds * SR) // CHUNK * CHUNK
    noisy, clean = np.zeros((streams, total), np.float32), np.zeros((streams, total), np.float32)
    for s in range(streams):
        pos = int(rng.uniform(0.3, 1.0) * SR)
        while pos < total:
            text = SENTENCES[rng.integers(len(SENTENCES))]
            u = _espeak(text, VOICES[rng.integers(len(VOICES))], int(rng.integers(130, 190)),
                        int(rng.integers(30, 70)))
            u = u / (np.abs(u).max() + 1e-9) * rng.uniform(0.2, 0.7)
            n = min(len(u), total - pos)
            clean[s, pos:pos + n] = u[:n]
            pos += n + int(rng.uniform(0.4, 1.5) * SR)
        noise = rng.standard_normal(total).astype(np.float32) * rng.uniform(0.001, 0.004)
        noisy[s] = np.clip(clean[s] + noise, -1, 1)
    return noisy, clean


def speech_labels(clean: np.ndarray, threshold_db: float = -40.0) -> np.ndarray:
    """1 per chunk whose clean-signal RMS is within `threshold_db` of the loudest chunk's."""
    chunks = clean.reshape(clean.shape[0], -1, CHUNK)
    rms = np.sqrt((chunks ** 2).mean(-1))
    ref = rms.max(axis=1, keepdims=True)
    return (20 * np.log10(rms / ref + 1e-12) > threshold_db).astype(np.int64)


def _build_vad(streams: int, seconds: float, seed: int, context: bool) -> dict[str, np.ndarray]:
    noisy, clean = speech_streams(streams, seconds, seed)
    labels = speech_labels(clean)
    n = noisy.shape[1] // CHUNK
    chunks = noisy.reshape(streams, n, CHUNK)
    if context:
        # The ONNX models take the previous chunk's last 64 samples in front (zeros at the start).
        prev = np.concatenate([np.zeros((streams, 1, CHUNK), np.float32), chunks[:, :-1]], axis=1)
        chunks = np.concatenate([prev[..., -CONTEXT:], chunks], axis=-1)
    if not context:
        # The TorchScript file's forward(x, sr) keeps state and context inside the module, so it
        # has no way to tell streams apart: its data are one stream, the streams one after another.
        return {"x": np.ascontiguousarray(chunks.reshape(streams * n, -1)), "labels": labels.reshape(-1)}
    return {
        "input": np.ascontiguousarray(chunks.reshape(streams * n, -1)),
        # The recurrent state, batch on axis 1 ([2, N, 128]); zeros start each stream.
        "state": np.zeros((2, streams * n, STATE_SIZE), np.float32),
        "sequence": np.repeat(np.arange(streams, dtype=np.int64), n),
        "labels": labels.reshape(-1),
    }


def vad(streams: int = 2, seconds: float = 8.0, seed: int = 0, context: bool = True) -> Path:
    """Speech chunks for silero-vad: the ONNX files' layout (context=True: input [T,576], state
    [2,T,128], sequence [T] stream ids) or the TorchScript file's (context=False: x [T,512], one
    stream; the module keeps its own state)."""
    return cached("vad", dict(streams=streams, seconds=seconds, seed=seed, context=context), _build_vad)


# ---------------------------------------------------------------------------------------------
# text (PaddleOCR tiny recognizer and detector)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf"]
WORDS = ("serve kit model repository batch queue latency gate export quantize calibrate validate "
         "onnx runtime tensor shape the of and to in is for on with 2026 42 3.14 v1.2 #17 $9.99 "
         "Hello World Paris London Berlin Tokyo OCR invoice total date name address phone email "
         "report page section figure table index data point value error").split()
OCR_H, OCR_W = 48, 320
MAX_LABEL = 40


def ctc_characters() -> list[str]:
    """The recognizer's classes: CTC blank, the dictionary stored in the model, then space."""
    import onnx

    m = onnx.load(str(asset("ocr-rec")), load_external_data=False)
    chars = next(p.value for p in m.metadata_props if p.key == "character").split("\n")
    return ["<blank>", *chars, " "]


def _font(name: str, size: int):
    from PIL import ImageFont

    path = FONT_DIR / name
    if not path.exists():
        raise RuntimeError(f"{path} not found: install the Debian package fonts-dejavu-core")
    return ImageFont.truetype(str(path), size)


def _render_line(text: str, font, fg: int, bg: int):
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = font.getbbox(text)
    pad = 4
    img = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), bg)
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, font=font, fill=fg)
    return img


def _rec_tensor(img) -> np.ndarray:
    """PaddleOCR's recognizer preprocessing: height 48, width by aspect (<= 320), [-1, 1], zero pad."""
    from PIL import Image

    w = min(OCR_W, max(1, int(round(img.width * OCR_H / img.height))))
    rgb = np.asarray(img.convert("RGB").resize((w, OCR_H), Image.BILINEAR), np.float32)
    out = np.zeros((3, OCR_H, OCR_W), np.float32)
    out[:, :, :w] = (rgb.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def _build_text_crops(samples: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    index = {c: i for i, c in enumerate(ctc_characters())}
    xs, labels = [], np.full((samples, MAX_LABEL), -1, np.int64)
    for i in range(samples):
        while True:
            text = " ".join(WORDS[j] for j in rng.integers(len(WORDS), size=rng.integers(1, 4)))
            font = _font(FONTS[rng.integers(len(FONTS))], int(rng.integers(26, 40)))
            img = _render_line(text, font, int(rng.integers(0, 70)), int(rng.integers(190, 256)))
            if img.width * OCR_H / img.height <= OCR_W and len(text) <= MAX_LABEL:
                break
        xs.append(_rec_tensor(img))
        labels[i, :len(text)] = [index[c] for c in text]
    return {"x": np.stack(xs), "labels": labels}


def text_crops(samples: int = 64, seed: int = 0) -> Path:
    """Rendered text lines for the recognizer: x [N,3,48,320], labels [N,40] class ids (-1 pad)."""
    return cached("ocr-rec", dict(samples=samples, seed=seed), _build_text_crops)


DET_SIZE = 320
DET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
DET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def _build_text_pages(samples: int, seed: int) -> dict[str, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    xs, masks = [], np.zeros((samples, DET_SIZE, DET_SIZE), np.uint8)
    for i in range(samples):
        bg = int(rng.integers(200, 256))
        page = Image.new("L", (DET_SIZE, DET_SIZE), bg)
        y = int(rng.integers(4, 30))
        while True:
            text = " ".join(WORDS[j] for j in rng.integers(len(WORDS), size=rng.integers(1, 4)))
            line = _render_line(text, _font(FONTS[rng.integers(len(FONTS))], int(rng.integers(14, 30))),
                                int(rng.integers(0, 80)), bg)
            if y + line.height > DET_SIZE - 4:
                break
            if line.width < DET_SIZE - 8:
                x = int(rng.integers(4, DET_SIZE - line.width - 3))
                page.paste(line, (x, y))
                # The box of the ink, not of the padded line image.
                ink = np.asarray(line) != bg
                rows, cols = np.where(ink.any(1))[0], np.where(ink.any(0))[0]
                if len(rows):
                    masks[i, y + rows[0]:y + rows[-1] + 1, x + cols[0]:x + cols[-1] + 1] = 1
            y += line.height + int(rng.integers(4, 24))
        rgb = np.asarray(page.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
        xs.append((rgb - DET_MEAN) / DET_STD)
    return {"x": np.stack(xs).astype(np.float32), "labels": masks}


def text_pages(samples: int = 16, seed: int = 0) -> Path:
    """Rendered pages for the detector: x [N,3,320,320] (ImageNet-normalized), labels [N,320,320] box mask."""
    return cached("ocr-det", dict(samples=samples, seed=seed), _build_text_pages)


# ---------------------------------------------------------------------------------------------
# faces (MTCNN)

SCENES = ["coffee", "rocket", "brick", "grass", "gravel", "coins", "moon", "page", "hubble_deep_field",
          "immunohistochemistry", "text", "camera"]


def _build_faces(size: int, nonface_crops: int, seed: int, part: int) -> dict[str, np.ndarray]:
    import skimage.data as sd
    from PIL import Image

    rng = np.random.default_rng(seed)
    lfw = (sd.lfw_subset() * 255).round().astype(np.uint8)  # 100 faces, then 100 non-faces (25x25)
    # part 0 and part 1 hold different halves of LFW's faces and non-faces: calibration and
    # evaluation sets never share an image.
    half = slice(0, 50) if part == 0 else slice(50, 100)
    faces = [*lfw[:100][half], *lfw[:100][half, :, ::-1]]
    nonfaces = list(lfw[100:][half])
    scenes = [getattr(sd, n)() for n in SCENES]
    for _ in range(nonface_crops):
        img = scenes[rng.integers(len(scenes))]
        s = int(rng.integers(24, min(img.shape[:2]) // 2))
        y, x = int(rng.integers(0, img.shape[0] - s)), int(rng.integers(0, img.shape[1] - s))
        nonfaces.append(img[y:y + s, x:x + s])
    xs = []
    for img in faces + nonfaces:
        im = Image.fromarray(np.ascontiguousarray(img)).convert("RGB").resize((size, size), Image.BILINEAR)
        xs.append(np.asarray(im).transpose(2, 0, 1))
    x = ((np.stack(xs).astype(np.float32) - 127.5) * 0.0078125)  # MTCNN's own normalization
    labels = np.array([1] * len(faces) + [0] * len(nonfaces), np.int64)
    order = rng.permutation(len(x))  # faces and non-faces mixed in every split
    return {"input": np.ascontiguousarray(x[order]), "labels": labels[order]}


def faces(size: int, nonface_crops: int = 50, seed: int = 0, part: int = 0) -> Path:
    """Face (1) / non-face (0) crops at size x size: input [N,3,size,size] in MTCNN's normalization;
    100 LFW faces (50 and their mirror images) and 50 LFW non-faces of `part` (0 or 1), plus
    `nonface_crops` crops of skimage's scenes."""
    return cached(f"faces{size}", dict(size=size, nonface_crops=nonface_crops, seed=seed, part=part),
                  _build_faces)
