import math
import threading

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.landmarks import FaceLandmarker


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def landmarker() -> FaceLandmarker:
    return FaceLandmarker()


def test_finds_the_astronaut_face_with_plausible_landmarks(landmarker, astronaut):
    face = landmarker.detect(astronaut)
    assert face is not None
    assert face.score > 0.7 and face.presence > 0.9
    x1, y1, x2, y2 = face.box
    # The face is in the upper middle of the 512x512 photo, about 100 px wide.
    assert 150 < x1 < x2 < 300 and 50 < y1 < y2 < 200 and 70 < x2 - x1 < 140
    points = face.landmarks
    assert points.shape == (468, 2) and points.dtype == np.float32
    nose = points[mesh.NOSE_TIP]
    assert x1 <= nose[0] <= x2 and y1 <= nose[1] <= y2
    eyes_y = (points[mesh.RIGHT_EYE_OUTER, 1] + points[mesh.LEFT_EYE_OUTER, 1]) / 2
    mouth_y = (points[mesh.MOUTH_RIGHT_CORNER, 1] + points[mesh.MOUTH_LEFT_CORNER, 1]) / 2
    assert eyes_y < nose[1] < mouth_y < points[mesh.CHIN, 1]
    # The person's right eye is on the image's left in an unmirrored photo.
    assert points[mesh.RIGHT_EYE_OUTER, 0] < nose[0] < points[mesh.LEFT_EYE_OUTER, 0]
    oval = points[list(mesh.FACE_OVAL)]
    assert oval[:, 0].min() < points[:, 0].min() + 1 and oval[:, 0].max() > points[:, 0].max() - 1


def test_no_face_in_a_gradient(landmarker):
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    assert landmarker.detect(gradient) is None


def test_tracking_follows_a_moved_face(landmarker, astronaut):
    face = landmarker.detect(astronaut)
    moved = cv2.warpAffine(astronaut, np.float32([[1, 0, 24], [0, 1, 12]]), (512, 512), borderMode=cv2.BORDER_REFLECT)
    tracked = landmarker.track(moved, face)
    assert tracked is not None
    shift = np.median(tracked.landmarks - face.landmarks, axis=0)
    np.testing.assert_allclose(shift, [24, 12], atol=2.0)


def test_tracking_reports_a_lost_face(landmarker, astronaut):
    face = landmarker.detect(astronaut)
    assert landmarker.track(np.full_like(astronaut, 90), face) is None


def test_tilted_face_is_landmarked_along_its_tilt(landmarker, astronaut):
    angle = 30.0
    rotation = cv2.getRotationMatrix2D((225, 130), angle, 1.0)
    tilted = cv2.warpAffine(astronaut, rotation, (512, 512), borderMode=cv2.BORDER_REFLECT)
    face = landmarker.detect(tilted)
    assert face is not None
    right, left = face.landmarks[mesh.RIGHT_EYE_OUTER], face.landmarks[mesh.LEFT_EYE_OUTER]
    # A counter-clockwise turn of the image raises the left eye.
    measured = -math.degrees(math.atan2(left[1] - right[1], left[0] - right[0]))
    assert abs(measured - angle) < 6


def test_full_range_model_finds_a_small_face(astronaut):
    canvas = np.full((1600, 1600, 3), 200, np.uint8)
    canvas[600:1112, 900:1412] = astronaut
    assert FaceLandmarker(detector="short").detect(canvas) is None
    face = FaceLandmarker(detector="auto").detect(canvas)
    assert face is not None
    nose = face.landmarks[mesh.NOSE_TIP]
    assert 1050 < nose[0] < 1200 and 650 < nose[1] < 800


def test_shared_between_threads(landmarker, astronaut):
    expected = landmarker.detect(astronaut).landmarks
    results: list[np.ndarray] = []

    def work() -> None:
        for _ in range(5):
            results.append(landmarker.detect(astronaut).landmarks)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 15
    for points in results:
        np.testing.assert_allclose(points, expected, atol=1e-3)


def test_rejects_images_that_are_not_rgb(landmarker):
    with pytest.raises(ValueError, match="RGB uint8"):
        landmarker.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        landmarker.detect(np.zeros((64, 64, 3), np.float32))
