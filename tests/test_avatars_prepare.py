import json
import threading
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.landmarks import FaceLandmarker
from avatalk.avatars.prepare import (
    AvatarPreparationCancelled,
    AvatarPreparationError,
    blend_mask,
    crop_boxes,
    fill_missing,
    nose_reference_y,
    pingpong_cycle,
    prepare_avatar,
    smooth_tracks,
)
from avatalk.avatars.prepare_input import Retimer as _Retimer
from avatalk.avatars.store import AvatarManifest, AvatarStore, InvalidAvatarId

SIZE = (320, 240)
SHIFT = 60  # pixels the face moves right over a test video


@pytest.fixture(scope="module")
def landmarker() -> FaceLandmarker:
    return FaceLandmarker()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


def make_video(
    path: Path,
    astronaut: np.ndarray,
    *,
    fps: int = 25,
    seconds: float = 2.0,
    codec: str = "libx264",
    blank: set[int] | frozenset[int] = frozenset(),
) -> Path:
    """The astronaut's face sliding right and growing; each frame's index is stamped in a corner."""
    count = round(fps * seconds)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(count):
            t = i / (count - 1)
            scale = 1.0 + 0.15 * t
            matrix = np.float64([[scale, 0, -150 * scale + SHIFT * t], [0, scale, -40 * scale]])
            frame = cv2.warpAffine(astronaut, matrix, SIZE, borderMode=cv2.BORDER_REFLECT)
            if i in blank:
                frame[:] = 128
            frame[-32:, -64:-32] = 16 * (i // 16) + 8  # index stamp, two base-16 digits: survives compression
            frame[-32:, -32:] = 16 * (i % 16) + 8
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def stamp(frame: np.ndarray) -> int:
    high, low = (float(frame[-24:-8, x : x + 16].mean()) for x in (-56, -24))
    return int(high // 16) * 16 + int(low // 16)


def read_frames(folder: Path, manifest: AvatarManifest) -> list[np.ndarray]:
    return [cv2.imread(str(folder / name)) for name in manifest.frames]


def assert_nothing_left(root: Path) -> None:
    assert not root.exists() or list(root.iterdir()) == []


# --- geometry -----------------------------------------------------------------------


def test_pingpong_cycle_turns_around_without_repeating_ends():
    assert pingpong_cycle(1) == [0]
    assert pingpong_cycle(2) == [0, 1]
    assert pingpong_cycle(5) == [0, 1, 2, 3, 4, 3, 2, 1]


def test_fill_missing_interpolates_between_and_holds_outside():
    tracks = np.zeros((6, 468, 2), np.float32)
    tracks[1], tracks[4] = 10.0, 40.0
    found = np.array([False, True, False, False, True, False])
    filled = fill_missing(tracks, found)
    np.testing.assert_allclose(filled[:, 0, 0], [10, 10, 20, 30, 40, 40])


def test_smoothing_removes_jitter_but_keeps_steady_motion():
    rng = np.random.default_rng(0)
    steady = np.linspace(0, 50, 40, dtype=np.float32)[:, None, None] * np.ones((1, 468, 2), np.float32)
    jittery = steady + rng.normal(0, 1.0, steady.shape).astype(np.float32)
    smoothed = smooth_tracks(jittery, 5)
    interior = slice(3, -3)
    assert np.abs(smoothed - steady)[interior].std() < 0.6 * np.abs(jittery - steady)[interior].std()
    np.testing.assert_allclose(smooth_tracks(steady, 5)[interior], steady[interior], atol=1e-4)
    assert smooth_tracks(steady[:1], 5).shape == (1, 468, 2)


def test_crop_box_follows_the_musetalk_rule(landmarker, astronaut):
    points = landmarker.detect(astronaut).landmarks[None]
    box = crop_boxes(points, 512, 512, chin_margin=0.05)[0]
    oval = points[0, list(mesh.FACE_OVAL)]
    chin = oval[:, 1].max()
    nose = nose_reference_y(points)[0]
    assert box[0] == np.floor(oval[:, 0].min()) and box[2] == np.ceil(oval[:, 0].max())
    assert box[1] == np.floor(2 * nose - chin)
    assert box[3] == np.ceil(chin + 0.05 * (chin - (2 * nose - chin)))
    assert points[0, mesh.NOSE_TIP, 1] > (box[1] + box[3]) / 2 - 15  # the nose is about mid-box


def test_crop_boxes_stay_inside_the_frame():
    points = np.zeros((1, 468, 2), np.float32)
    points[0, :, 0] = np.linspace(-40, 90, 468)
    points[0, :, 1] = np.linspace(-80, 130, 468)
    x1, y1, x2, y2 = crop_boxes(points, 100, 100)[0]
    assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100


def test_blend_mask_covers_the_lower_face_and_fades_out_at_the_edges(landmarker, astronaut):
    points = landmarker.detect(astronaut).landmarks
    box = crop_boxes(points[None], 512, 512)[0]
    mask = blend_mask(points, box, 256)
    assert mask.shape == (256, 256) and mask.dtype == np.uint8
    assert mask[:120].max() < 20  # nothing above the middle (eyes, brows)
    assert mask[170:200, 110:146].min() > 240  # mouth and chin fully replaced
    assert mask[:, 0].max() == 0 and mask[:, -1].max() == 0 and mask[-1].max() == 0


def test_retimer_maps_output_frames_to_the_nearest_input_frame():
    frames = [(i / 30, i) for i in range(60)]  # 2 s at 30 fps
    out = list(_Retimer(25, 500, 1 / 30)(frames))
    assert [k for k, _, _ in out] == list(range(50))
    chosen = [image for _, _, image in out]
    assert chosen == [round(k * 30 / 25) for k in range(50)]


def test_retimer_repeats_frames_of_slow_and_variable_input():
    times = [0.0, 0.1, 0.15, 0.4]  # gaps of 100, 50 and 250 ms, the last frame lasting 250 ms
    out = [image for _, _, image in _Retimer(25, 500, 0.04)([(t, i) for i, t in enumerate(times)])]
    assert len(out) == 16  # 0.65 s
    assert out == [0, 0, 1, 1, 2, 2, 2] + [3] * 9  # output times 0, 40, 80... ms take the nearest input


def test_retimer_without_timestamps_uses_the_stream_rate():
    out = list(_Retimer(25, 500, 1 / 50)([(None, i) for i in range(10)]))
    assert [image for _, _, image in out] == [0, 2, 4, 6, 8]


def test_retimer_cuts_at_the_limit():
    retimer = _Retimer(25, 10, 0.04)
    out = list(retimer([(i / 25, i) for i in range(30)]))
    assert len(out) == 10 and retimer.truncated
    exact = _Retimer(25, 10, 0.04)
    assert len(list(exact([(i / 25, i) for i in range(10)]))) == 10 and not exact.truncated


# --- preparing -------------------------------------------------------------------------


def test_prepare_photo(tmp_path, astronaut, landmarker):
    photo = tmp_path / "portrait.jpeg"
    cv2.imwrite(str(photo), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    root = tmp_path / "avatars"
    manifest = prepare_avatar(photo, "astro", "Astronaut", root, still_seconds=2.0, landmarker=landmarker)
    assert manifest.source.kind == "image" and manifest.source.filename == "portrait.jpeg"
    assert manifest.frame_count == 50 and manifest.fps == 25
    assert (manifest.width, manifest.height) == (512, 512)
    assert len(set(manifest.frames)) == 1 and len(set(manifest.masks.files)) == 1  # stored once
    assert manifest.cycle == pingpong_cycle(50)
    folder = root / "astro"
    assert AvatarManifest.from_file(folder / "manifest.json") == manifest
    boxes = np.load(folder / "boxes.npy")
    assert boxes.shape == (50, 4) and (boxes == boxes[0]).all()
    assert sorted(p.name for p in root.iterdir()) == ["astro"]  # no temporary folder left


def test_prepare_video_follows_the_moving_face(tmp_path, astronaut, landmarker):
    video = make_video(tmp_path / "clip.mp4", astronaut)
    stages: list[tuple[str, float]] = []
    manifest = prepare_avatar(
        video, "clip", "Clip", tmp_path / "avatars", landmarker=landmarker, progress=lambda s, f: stages.append((s, f))
    )
    assert manifest.frame_count == 50 and manifest.fps == 25
    assert (manifest.width, manifest.height) == SIZE
    assert manifest.source.kind == "video" and manifest.source.codec == "h264"
    assert manifest.source.fps == 25 and not manifest.source.truncated
    assert manifest.missing_faces == [] and manifest.latents == {}
    assert manifest.cycle == pingpong_cycle(50)
    folder = tmp_path / "avatars" / "clip"
    frames = read_frames(folder, manifest)
    assert [stamp(f) for f in frames] == list(range(50))
    boxes = np.load(folder / "boxes.npy")
    landmarks = np.load(folder / "landmarks.npy")
    assert landmarks.shape == (50, 468, 2) and landmarks.dtype == np.float32
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    widths = boxes[:, 2] - boxes[:, 0]
    # The face slides SHIFT px right (plus the zoom about the origin) and grows by 15 %.
    assert SHIFT < centres[-1] - centres[0] < SHIFT + 45
    assert np.all(np.diff(centres) > -1.5)  # steady, no jumps back
    assert 1.08 < widths[-1] / widths[0] < 1.22
    mask = cv2.imread(str(folder / manifest.masks.files[0]), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (manifest.masks.size, manifest.masks.size)
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["version"] == 1 and raw["id"] == "clip" and raw["latents"] == {}
    # Progress: every stage rises to its end, and the last word is "done".
    assert stages[-1] == ("done", 1.0)
    for stage in ("analysing", "finishing"):
        fractions = [f for s, f in stages if s == stage]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_30_fps_video_is_retimed_to_25(tmp_path, astronaut, landmarker):
    video = make_video(tmp_path / "clip30.mp4", astronaut, fps=30, codec="mpeg4")
    manifest = prepare_avatar(video, "clip30", "Clip", tmp_path / "avatars", landmarker=landmarker)
    assert manifest.frame_count == 50 and manifest.source.fps == 30 and manifest.source.codec == "mpeg4"
    frames = read_frames(tmp_path / "avatars" / "clip30", manifest)
    assert [stamp(f) for f in frames] == [round(k * 30 / 25) for k in range(50)]


def test_long_video_is_cut_at_max_seconds(tmp_path, astronaut, landmarker):
    video = make_video(tmp_path / "long.mp4", astronaut, seconds=2.0)
    manifest = prepare_avatar(video, "cut", "Cut", tmp_path / "avatars", max_seconds=1.0, landmarker=landmarker)
    assert manifest.frame_count == 25 and manifest.source.truncated


def test_large_frames_are_scaled_down(tmp_path, astronaut, landmarker):
    video = make_video(tmp_path / "clip.mp4", astronaut)
    full = prepare_avatar(video, "full", "Full", tmp_path / "avatars", max_seconds=0.4, landmarker=landmarker)
    half = prepare_avatar(
        video, "half", "Half", tmp_path / "avatars", max_seconds=0.4, max_side=160, landmarker=landmarker
    )
    assert (half.width, half.height) == (160, 120) and half.frame_count == full.frame_count == 10
    full_points = np.load(tmp_path / "avatars" / "full" / "landmarks.npy")
    half_points = np.load(tmp_path / "avatars" / "half" / "landmarks.npy")
    nose = mesh.NOSE_TIP
    np.testing.assert_allclose(half_points[:, nose] * 2, full_points[:, nose], atol=4.0)


def test_video_cut_to_a_square_frame(tmp_path, astronaut, landmarker):
    video = make_video(tmp_path / "clip.mp4", astronaut)
    manifest = prepare_avatar(video, "square", "Square", tmp_path / "avatars", frame_size=160, landmarker=landmarker)
    assert (manifest.width, manifest.height) == (160, 160) and manifest.frame_count == 50
    folder = tmp_path / "avatars" / "square"
    frames = read_frames(folder, manifest)
    assert frames[0].shape == (160, 160, 3)
    landmarks = np.load(folder / "landmarks.npy")
    nose = landmarks[:, mesh.NOSE_TIP]
    assert (nose >= 0).all() and (nose < 160).all()
    # The landmarks still sit on the face: the re-detected nose agrees with the stored one.
    found = landmarker.detect(cv2.cvtColor(frames[25], cv2.COLOR_BGR2RGB))
    np.testing.assert_allclose(found.landmarks[mesh.NOSE_TIP], nose[25], atol=4.0)


def test_a_few_faceless_frames_are_filled_in(tmp_path, astronaut, landmarker):
    blank = {20, 21, 22, 23}
    video = make_video(tmp_path / "gaps.mp4", astronaut, blank=blank)
    manifest = prepare_avatar(video, "gaps", "Gaps", tmp_path / "avatars", landmarker=landmarker)
    assert manifest.frame_count == 50 and manifest.missing_faces == sorted(blank)
    boxes = np.load(tmp_path / "avatars" / "gaps" / "boxes.npy")
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert centres[19] <= centres[21] <= centres[24]  # interpolated, cycle not shifted
    frames = read_frames(tmp_path / "avatars" / "gaps", manifest)
    assert [stamp(f) for f in frames] == list(range(50))


def test_too_many_faceless_frames_fail(tmp_path, astronaut, landmarker):
    video = make_video(tmp_path / "mostly-empty.mp4", astronaut, blank=set(range(15)))
    root = tmp_path / "avatars"
    with pytest.raises(AvatarPreparationError, match=r"no face was found in 15 of 50 frames \(30 %"):
        prepare_avatar(video, "empty", "Empty", root, landmarker=landmarker)
    assert_nothing_left(root)
    manifest = prepare_avatar(video, "empty", "Empty", root, landmarker=landmarker, max_missing_fraction=0.5)
    assert len(manifest.missing_faces) == 15


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("random.mp4", np.random.default_rng(1).bytes(50_000), "random.mp4 is not a readable video or image"),
        ("notes.txt", b"hello, this is not a video\n" * 20, "notes.txt is not a readable video or image"),
        ("empty.mov", b"", "empty.mov is not a readable video or image"),
    ],
)
def test_unreadable_files_fail_clearly(tmp_path, landmarker, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    root = tmp_path / "avatars"
    with pytest.raises(AvatarPreparationError, match=message):
        prepare_avatar(source, "broken", "Broken", root, landmarker=landmarker)
    assert_nothing_left(root)


def test_truncated_image_fails_clearly(tmp_path, astronaut, landmarker):
    _, encoded = cv2.imencode(".png", astronaut)
    source = tmp_path / "cut.png"
    source.write_bytes(encoded.tobytes()[:200])
    with pytest.raises(AvatarPreparationError, match=r"cut\.png is not a readable image"):
        prepare_avatar(source, "cut", "Cut", tmp_path / "avatars", landmarker=landmarker)
    assert_nothing_left(tmp_path / "avatars")


def test_photo_without_a_face_fails(tmp_path, landmarker):
    gradient = np.tile(np.linspace(0, 255, 400, dtype=np.uint8)[None, :, None], (300, 1, 3))
    source = tmp_path / "gradient.png"
    cv2.imwrite(str(source), gradient)
    root = tmp_path / "avatars"
    with pytest.raises(AvatarPreparationError, match=r"no face was found in the photo gradient\.png"):
        prepare_avatar(source, "nobody", "Nobody", root, landmarker=landmarker)
    assert_nothing_left(root)


@pytest.mark.parametrize("name", ["", "   ", "x" * 201])
def test_bad_display_names_fail_before_any_work(tmp_path, astronaut, landmarker, name):
    photo = tmp_path / "face.png"
    cv2.imwrite(str(photo), astronaut)
    with pytest.raises(AvatarPreparationError, match="display name"):
        prepare_avatar(photo, "named", name, tmp_path / "avatars", landmarker=landmarker)
    assert_nothing_left(tmp_path / "avatars")


def test_missing_source_fails(tmp_path, landmarker):
    with pytest.raises(AvatarPreparationError, match="does not exist"):
        prepare_avatar(tmp_path / "nope.mp4", "nope", "Nope", tmp_path / "avatars", landmarker=landmarker)


@pytest.mark.parametrize("bad_id", ["../x", "a/b", ".", "..", "", "Upper", "-dash", "x" * 65])
def test_invalid_ids_are_rejected_before_any_work(tmp_path, astronaut, landmarker, bad_id):
    photo = tmp_path / "face.png"
    cv2.imwrite(str(photo), astronaut)
    with pytest.raises(InvalidAvatarId):
        prepare_avatar(photo, bad_id, "Bad", tmp_path / "avatars", landmarker=landmarker)
    assert not (tmp_path / "x").exists()
    assert_nothing_left(tmp_path / "avatars")


def test_existing_id_is_not_overwritten_unless_asked(tmp_path, astronaut, landmarker):
    photo = tmp_path / "face.png"
    cv2.imwrite(str(photo), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    root = tmp_path / "avatars"
    first = prepare_avatar(photo, "twice", "First", root, landmarker=landmarker)
    with pytest.raises(AvatarPreparationError, match="already exists"):
        prepare_avatar(photo, "twice", "Second", root, landmarker=landmarker)
    assert AvatarStore(root).get("twice") == first
    second = prepare_avatar(photo, "twice", "Second", root, landmarker=landmarker, overwrite=True)
    assert AvatarStore(root).get("twice").display_name == "Second" == second.display_name
    assert sorted(p.name for p in root.iterdir()) == ["twice"]


def test_cancel_stops_and_cleans_up(tmp_path, astronaut, landmarker):
    video = make_video(tmp_path / "clip.mp4", astronaut)
    cancel = threading.Event()

    def progress(stage: str, fraction: float) -> None:
        if fraction > 0.3:
            cancel.set()

    root = tmp_path / "avatars"
    with pytest.raises(AvatarPreparationCancelled):
        prepare_avatar(video, "stopped", "Stopped", root, landmarker=landmarker, progress=progress, cancel=cancel)
    assert_nothing_left(root)


def test_a_file_without_a_video_stream_fails(tmp_path, landmarker):
    """An MP4 container holding only sound (a voice memo) is no avatar source."""
    source = tmp_path / "voice.m4a"
    with av.open(str(source), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        noise = np.random.default_rng(2).uniform(-0.05, 0.05, (1, 1024)).astype(np.float32)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(noise, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    root = tmp_path / "avatars"
    with pytest.raises(AvatarPreparationError, match=r"voice\.m4a has no video stream"):
        prepare_avatar(source, "voice", "Voice", root, landmarker=landmarker)
    assert_nothing_left(root)


def test_a_video_without_a_face_in_any_frame_fails(tmp_path, astronaut, landmarker):
    video = make_video(tmp_path / "nobody.mp4", astronaut, blank=set(range(50)))
    root = tmp_path / "avatars"
    with pytest.raises(AvatarPreparationError, match=r"no face was found in the video nobody\.mp4"):
        prepare_avatar(video, "nobody", "Nobody", root, landmarker=landmarker)
    assert_nothing_left(root)


def test_a_video_that_stops_decoding_partway_fails_and_leaves_nothing(tmp_path, astronaut, landmarker):
    """Frame 25 of 50 is corrupt: the first 24 were decoded and analysed, then the job fails cleanly."""
    source = tmp_path / "broken.avi"
    with av.open(str(source), "w", format="avi") as container:
        stream = container.add_stream("png", rate=25)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "rgb24"
        face = cv2.resize(astronaut, SIZE)
        for _ in range(50):
            for packet in stream.encode(av.VideoFrame.from_ndarray(face, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(source.read_bytes())
    at = -1
    for _ in range(25):  # the 25th PNG image in the file
        at = data.index(b"\x89PNG", at + 1)
    data[at : at + 64] = bytes(64)
    source.write_bytes(bytes(data))
    progress: list[float] = []
    root = tmp_path / "avatars"
    with pytest.raises(AvatarPreparationError, match=r"broken\.avi could not be decoded"):
        prepare_avatar(
            source, "broken", "Broken", root, landmarker=landmarker, progress=lambda stage, f: progress.append(f)
        )
    assert progress and 0 < max(progress) < 1  # it failed partway, not at the start
    assert_nothing_left(root)
