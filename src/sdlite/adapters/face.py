"""Face analysis for InstantID and IP-Adapter FaceID: the 512-d identity embedding and the five keypoints of a face,
computed with insightface (Deng et al. 2019, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition";
its SCRFD detector) as the reference pipelines do. Optional: ``pip install sdlite[face]`` installs insightface and
onnxruntime; the model files (``antelopev2`` for InstantID, ``buffalo_l`` for FaceID) are the user's, in
``ROOT/models/NAME/*.onnx``. sdlite never downloads them (insightface would), so a missing folder is an error.

    face = sdlite.adapters.face.analyse(photo, root="~/.insightface")       # the largest face
    unit = sdlite.InstantIDUnit("ip-adapter.bin", "ControlNetModel", face.embedding, face.keypoints,
                                keypoints_size=photo.size)

InstantX's pipeline gives InstantID the raw ``embedding``; tencent-ailab's FaceID examples give the L2-normalised
``normed_embedding``. Both are on the returned :class:`Face`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import SdliteError

INSTALL = "pip install sdlite[face]"


@dataclass(frozen=True)
class Face:
    """One detected face: ``box`` (x1, y1, x2, y2) and ``keypoints`` [5, 2] in the picture's pixels (eyes, nose
    tip, mouth corners), the identity ``embedding`` [512] and its unit-length ``normed_embedding``."""

    box: np.ndarray
    keypoints: np.ndarray
    embedding: np.ndarray

    @property
    def normed_embedding(self) -> np.ndarray:
        return self.embedding / np.linalg.norm(self.embedding)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box[:4]
        return float((x2 - x1) * (y2 - y1))


def largest(faces: Sequence[Face]) -> Face:
    """The face with the largest box, the one the reference pipelines use when a picture has several."""
    if not faces:
        raise SdliteError("no face was found in the picture")
    return max(faces, key=lambda f: f.area)


def _bgr(image: Image.Image) -> np.ndarray:
    """insightface's detector reads OpenCV's BGR channel order."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def model_folder(root: str | os.PathLike, name: str) -> str:
    """``root/models/name``, checked to hold ONNX files before insightface sees it."""
    folder = os.path.join(os.path.expanduser(str(root)), "models", name)
    if not os.path.isdir(folder) or not any(f.endswith(".onnx") for f in os.listdir(folder)):
        raise SdliteError(f"insightface model files {name!r} not found in {folder} (expected its .onnx files there; "
                          f"sdlite does not download them)")
    return folder


@functools.lru_cache(maxsize=2)
def _analyser(root: str, name: str, det_size: int, providers: tuple[str, ...] | None):
    try:
        from insightface.app import FaceAnalysis
    except ImportError:
        raise SdliteError(f"face analysis needs insightface and onnxruntime: {INSTALL}") from None
    app = FaceAnalysis(name=name, root=root, **({"providers": list(providers)} if providers else {}))
    app.prepare(ctx_id=0, det_size=(det_size, det_size))
    return app


def detect(image: Image.Image, *, root: str | os.PathLike = "~/.insightface", name: str = "antelopev2",
           det_size: int = 640, providers: Sequence[str] | None = None) -> list[Face]:
    """Every face insightface's ``FaceAnalysis(name)`` finds in ``image`` (PIL), largest first. ``det_size``: the
    detector's input side (640 in the reference pipelines); ``providers``: onnxruntime's execution providers."""
    model_folder(root, name)
    app = _analyser(os.path.expanduser(str(root)), name, det_size, tuple(providers) if providers else None)
    faces = [Face(np.asarray(f.bbox, dtype=np.float32), np.asarray(f.kps, dtype=np.float32),
                  np.asarray(f.embedding, dtype=np.float32)) for f in app.get(_bgr(image))]
    return sorted(faces, key=lambda f: -f.area)


def analyse(image: Image.Image, **options) -> Face:
    """The largest face of ``image`` (options as :func:`detect`); an error when there is none."""
    return largest(detect(image, **options))


def face_embedding(image: Image.Image, normed: bool = False, **options) -> np.ndarray:
    """The largest face's 512-d embedding: raw (InstantID) or, with ``normed=True``, unit length (FaceID)."""
    face = analyse(image, **options)
    return face.normed_embedding if normed else face.embedding


def face_keypoints(image: Image.Image, **options) -> np.ndarray:
    """The largest face's five keypoints [5, 2] in ``image``'s pixels (draw them with ``keypoints.draw_kps``)."""
    return analyse(image, **options).keypoints
