"""sdlite.adapters.face without insightface: the error that says what to install, the model-folder check (nothing
is downloaded), and the parts around insightface's FaceAnalysis (BGR input, the largest face, the normalised
embedding) with a stand-in module that records what it is given."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image

from sdlite.adapters import face
from sdlite.errors import SdliteError


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models" / "antelopev2"
    folder.mkdir(parents=True)
    (folder / "glintr100.onnx").write_bytes(b"")
    face._analyser.cache_clear()
    yield tmp_path
    face._analyser.cache_clear()


def test_missing_insightface_names_the_extra(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # import insightface raises ImportError
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(SdliteError, match=r"pip install sdlite\[face\]"):
        face.face_embedding(Image.new("RGB", (32, 32)), root=models)


def test_missing_model_files_are_not_downloaded(tmp_path):
    with pytest.raises(SdliteError, match="'buffalo_l' not found in .*models.buffalo_l.*does not download"):
        face.detect(Image.new("RGB", (32, 32)), root=tmp_path, name="buffalo_l")


def test_largest_face_and_embeddings(models, monkeypatch):
    seen = {}

    class FaceAnalysis:
        def __init__(self, name, root, providers=None):
            seen.update(name=name, root=root, providers=providers)

        def prepare(self, ctx_id, det_size):
            seen["det_size"] = det_size

        def get(self, bgr):
            seen["pixel"] = bgr[0, 0].tolist()
            small = types.SimpleNamespace(bbox=[0, 0, 10, 10], kps=np.zeros((5, 2)), embedding=np.ones(512))
            big = types.SimpleNamespace(bbox=[5, 5, 30, 25], kps=np.arange(10.0).reshape(5, 2),
                                        embedding=np.full(512, 3.0))
            return [small, big]

    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FaceAnalysis
    monkeypatch.setitem(sys.modules, "insightface", types.ModuleType("insightface"))
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    photo = Image.new("RGB", (40, 30), (200, 100, 50))
    found = face.detect(photo, root=models, det_size=320, providers=["CPUExecutionProvider"])
    assert [f.area for f in found] == [500.0, 100.0]
    assert seen == {"name": "antelopev2", "root": str(models), "providers": ["CPUExecutionProvider"],
                    "det_size": (320, 320), "pixel": [50, 100, 200]}  # BGR, as OpenCV-read pictures are
    assert np.array_equal(face.face_keypoints(photo, root=models), np.arange(10.0).reshape(5, 2))
    assert np.array_equal(face.face_embedding(photo, root=models), np.full(512, 3.0, dtype=np.float32))
    normed = face.face_embedding(photo, root=models, normed=True)
    assert np.allclose(normed, np.full(512, 512 ** -0.5), rtol=1e-6)
    with pytest.raises(SdliteError, match="no face"):
        face.largest([])
