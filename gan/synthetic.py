"""Procedurally generated anime-style faces, for smoke runs and tests without a data set.

Each image is a background, back hair, a skin-coloured face, a fringe of bangs, two large
eyes (iris, pupil, highlight), blush and a mouth, with random colours, position, scale and
head tilt. The structure is simple enough for a small GAN to learn within minutes, yet
varied enough that FID keeps falling as it does. Shapes have soft (anti-aliased) edges so
the images are not trivially separable by a pixel-exact rule.
"""
from __future__ import annotations

import numpy as np

_HAIR_COLOURS = np.array(
    [
        [40, 30, 30], [90, 55, 35], [230, 200, 120], [200, 60, 60], [60, 90, 200],
        [220, 120, 180], [230, 230, 240], [70, 160, 90], [140, 90, 200], [250, 150, 60],
    ],
    dtype=np.float32,
)
_IRIS_COLOURS = np.array(
    [[60, 110, 220], [60, 170, 90], [170, 60, 60], [150, 80, 200], [200, 140, 40], [70, 60, 50]],
    dtype=np.float32,
)
_CHUNK = 128  # images rendered at once; bounds the float32 working memory (~50 MB at 64 px)


def synthetic_faces(n: int, size: int, seed: int) -> np.ndarray:
    """Return `n` face-like images as uint8 of shape (n, 3, size, size); deterministic in `seed`."""
    if n < 0 or size < 1:
        raise ValueError(f"synthetic_faces needs n >= 0 and size >= 1, got n={n}, size={size}")
    params = _draw_params(np.random.default_rng(seed), n)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        chunk = {k: v[start : start + _CHUNK] for k, v in params.items()}
        out[start : start + _CHUNK] = _render(chunk, size)
    return out


def _draw_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """All random choices up front, so the result does not depend on the render chunking."""

    def u(lo: float, hi: float, shape: tuple[int, ...] = ()) -> np.ndarray:
        return rng.uniform(lo, hi, (n, *shape)).astype(np.float32)

    skin_base = np.array([250, 220, 200], dtype=np.float32)
    return {
        "background": u(20, 235, (3,)),
        "background_tilt": u(-40, 40, (3,)),  # vertical gradient per channel
        "face_x": u(-0.1, 0.1),
        "face_y": u(0.05, 0.2),
        "face_r": u(0.5, 0.62),
        "face_aspect": u(1.05, 1.25),  # height / width of the face ellipse
        "tilt": u(-0.25, 0.25),  # radians
        "skin": np.clip(skin_base + u(-25, 5, (1,)) * np.array([1.0, 1.3, 1.5], np.float32), 0, 255),
        "hair": _HAIR_COLOURS[rng.integers(0, len(_HAIR_COLOURS), n)] + u(-20, 20, (3,)),
        "hair_volume": u(1.15, 1.45),
        "fringe_height": u(-0.45, -0.2),  # fringe edge, in face-radius units above the centre
        "fringe_waves": rng.integers(3, 7, n).astype(np.float32),
        "fringe_depth": u(0.05, 0.2),
        "iris": _IRIS_COLOURS[rng.integers(0, len(_IRIS_COLOURS), n)] + u(-25, 25, (3,)),
        "eye_spacing": u(0.36, 0.5),
        "eye_y": u(0.0, 0.15),
        "eye_w": u(0.16, 0.23),
        "eye_h": u(0.24, 0.34),
        "mouth_y": u(0.5, 0.65),
        "mouth_w": u(0.08, 0.18),
        "mouth_open": u(0.02, 0.08),
        "blush": u(0.0, 0.45),
    }


def _render(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    count = len(p["face_r"])
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    gy, gx = coords[None, :, None], coords[None, None, :]
    edge = 2.0 / size  # one pixel in these units: the width of the soft edges

    def col(name: str) -> np.ndarray:  # (count, 3) -> broadcastable to (count, H, W, 3)
        return p[name][:, None, None, :]

    def scalar(name: str) -> np.ndarray:  # (count,) -> (count, 1, 1)
        return p[name][:, None, None]

    def blend(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
        img += mask[..., None] * (colour - img)
        return img

    # Face-aligned coordinates, in face radii, rotated by the head tilt.
    radius = scalar("face_r")
    dx, dy = gx - scalar("face_x"), gy - scalar("face_y")
    cos, sin = np.cos(scalar("tilt")), np.sin(scalar("tilt"))
    fx, fy = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius
    face_edge = edge / radius

    def ellipse(cx: float | np.ndarray, cy: float | np.ndarray, rx, ry) -> np.ndarray:
        """Soft mask of an ellipse in face coordinates."""
        dist = np.sqrt(((fx - cx) / rx) ** 2 + ((fy - cy) / ry) ** 2)
        return np.clip((1 - dist) * np.minimum(rx, ry) / face_edge + 0.5, 0, 1)

    background = col("background") + col("background_tilt") * gy[..., None]
    img = np.broadcast_to(background, (count, size, size, 3)).astype(np.float32)  # writable copy

    aspect = scalar("face_aspect")
    volume = scalar("hair_volume")
    img = blend(img, ellipse(0.0, -0.15, volume, volume * aspect), col("hair"))
    face = ellipse(0.0, 0.0, 1.0, aspect)
    img = blend(img, face, col("skin"))

    # Bangs: hair covers the face above a wavy line.
    waves = np.abs(np.sin(fx * scalar("fringe_waves") * np.pi / 2))
    fringe_line = scalar("fringe_height") + scalar("fringe_depth") * (1 - waves)
    # Slightly wider than the face, so no sliver of the face's soft edge shows through.
    fringe_area = ellipse(0.0, 0.0, 1.05, aspect * 1.05)
    fringe = fringe_area * np.clip((fringe_line - fy) / face_edge + 0.5, 0, 1)
    img = blend(img, fringe, col("hair"))

    # The two eyes never overlap, so each eye layer is one blend of both eyes' masks.
    white = np.float32(255)
    ew, eh, ey = scalar("eye_w"), scalar("eye_h"), scalar("eye_y")
    eye_x = (-scalar("eye_spacing"), scalar("eye_spacing"))

    def both_eyes(dx, dy, rx, ry, spread: float = 1.0) -> np.ndarray:
        """Mask of an ellipse placed at both eyes, offset by (dx, dy)."""
        return np.maximum(*(ellipse(ex * spread + dx, ey + dy, rx, ry) for ex in eye_x))

    img = blend(img, both_eyes(0.0, 0.0, ew * 1.2, eh * 1.05), white)
    img = blend(img, both_eyes(0.0, eh * 0.08, ew, eh), col("iris"))
    img = blend(img, both_eyes(0.0, eh * 0.15, ew * 0.5, eh * 0.5), col("iris") * 0.35)
    img = blend(img, both_eyes(-ew * 0.35, -eh * 0.4, ew * 0.32, eh * 0.22), white)
    cheeks = both_eyes(0.0, scalar("mouth_y") - 0.22 - ey, ew * 1.2, 0.08, spread=1.15)
    img = blend(img, cheeks * scalar("blush"), np.array([240, 120, 130], np.float32))

    mouth = ellipse(0.0, scalar("mouth_y"), scalar("mouth_w"), scalar("mouth_open"))
    img = blend(img, mouth, np.array([150, 40, 50], np.float32))

    return np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)
