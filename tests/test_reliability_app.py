"""App sessions and uploads (issue 17, audit): a browser session's chat and live runs are private to it —
listed to no other session, not openable by a name another session could know or guess — until saved
to the shared runs directory on purpose; a non-image upload to Chat is a clear message.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

import workbench  # noqa: E402
from apps import private_runs  # noqa: E402
from apps import views as v  # noqa: E402
from apps.checked_image import NOT_AN_IMAGE, checked_image  # noqa: E402
from workbench.store import list_runs  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return workbench.load_model("tiny")


def test_live_runs_are_private_until_published(model, tmp_path):
    lock = threading.Lock()
    mine, _ = v.record_live(model, lock, tmp_path, "my secret prompt")
    theirs, _ = v.record_live(model, lock, tmp_path, "another user's prompt")
    assert private_runs.is_private(mine) and mine != theirs
    assert list_runs(tmp_path) == [] and v.runs_table(tmp_path)["name"].tolist() == []   # listed to nobody
    assert v.open_cached(v.resolve_run(tmp_path, mine)).n_docs == 1                        # opens for its owner
    token, run = mine[1:].split("/")
    guessed = f"@{'0' * 32}/{run}"                       # the run's name without its owner's secret token
    with pytest.raises(v.UserError, match="No run named .* in this session"):
        v.resolve_run(tmp_path, guessed)
    for bad in (f"@{token}/../{run}", f"@{token}/x/../{run}", f"@{token[:8]}/{run}", "@/etc/passwd", f"@{token}/"):
        with pytest.raises(v.UserError, match="Invalid private run name"):
            v.resolve_run(tmp_path, bad)
    shared = private_runs.publish(tmp_path, mine)
    assert shared == run and [Path(r["path"]).name for r in list_runs(tmp_path)] == [run]
    assert v.open_cached(v.resolve_run(tmp_path, shared)).tokens(0).tolist() == \
        v.open_cached(v.resolve_run(tmp_path, mine)).tokens(0).tolist()
    with pytest.raises(private_runs.PrivateRunError, match="exists already"):
        private_runs.publish(tmp_path, mine)
    assert private_runs.publish(tmp_path, shared) == shared                                  # shared already


def test_private_run_symlinked_out_is_refused(model, tmp_path):
    name, _ = v.record_live(model, threading.Lock(), tmp_path, "hello")
    token, run = name[1:].split("/")
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.rename(tmp_path / ".private" / token / run, other / run)
    (tmp_path / ".private" / token / run).symlink_to(other / run)
    with pytest.raises(v.UserError, match="No run named"):
        v.resolve_run(tmp_path, name)


def test_chat_runs_are_private_to_their_session(model, tmp_path):
    from apps import chat_views as cv

    turn = cv.chat_turn(model, threading.Lock(), tmp_path, None, "", "hello there", 3)
    assert private_runs.is_private(turn.run) and "/chat-" in turn.run
    assert v.runs_table(tmp_path)["name"].tolist() == []
    again = cv.chat_turn(model, threading.Lock(), tmp_path, turn.session, "", "and again", 2)
    assert again.run == turn.run and v.open_cached(v.resolve_run(tmp_path, turn.run)).n_docs == 2


def test_non_image_upload_to_chat_is_a_clear_message(tmp_path):
    from gradio.data_classes import ImageData

    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    comp = checked_image(gr.Image(type="pil"))
    with pytest.raises(gr.Error) as e:
        comp.preprocess(ImageData(path=str(bad), orig_name="notes.png"))
    assert e.value.message == NOT_AN_IMAGE


@pytest.mark.slow
def test_sessions_over_http_see_only_their_own_runs_and_share_on_purpose(model, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    from conftest import served_app

    with served_app(model, tmp_path, "tiny") as (_, url, _):
        a, b = (gradio_client.Client(url, verbose=False) for _ in range(2))
        pick = a.predict("private words of a", 0, api_name="/live")[1]        # (runs, pick, text, summary)
        name_a = pick.get("value", pick) if isinstance(pick, dict) else pick
        assert private_runs.is_private(name_a)
        listed_b = b.predict(api_name="/runs")[0]
        assert not any("live-" in str(r[0]) for r in listed_b["data"])               # b sees nothing of a's
        with pytest.raises(gradio_client.exceptions.AppError, match="Open a chat or live run made in this session"):
            b.predict(api_name="/share_run")                                          # b has no run open
        _, pick, summary = a.predict(api_name="/share_run")                          # a saves it on purpose
        shared = pick.get("value", pick) if isinstance(pick, dict) else pick
        assert "@" not in shared and shared in [r[0] for r in b.predict(api_name="/runs")[0]["data"]]


def test_the_app_verifies_small_runs_when_it_opens_them(tmp_path):
    """A run whose chunks were swapped (each still valid) opens elsewhere; the app verifies it and says so."""
    import numpy as np

    from workbench.config import preset
    from workbench.store import RunWriter

    path = tmp_path / "r.zarr"
    rng = np.random.default_rng(0)
    with RunWriter.create(path, attrs={"model_source": "tiny", "config": preset("tiny").to_hf()},
                          layout=dict(n_layers=4, n_heads=4, moe_layer_index=[0, 1, 3], top_k=1, n_experts=4,
                                      router=True)) as w:
        w.append({"tokens": rng.integers(0, 384, 9), "router/experts": rng.integers(0, 4, (3, 9, 1)),
                  "router/weights": rng.random((3, 9, 1)), "doc_id": "d"})
    a, b = sorted(p for p in (path / "router" / "weights" / "c").rglob("*") if p.is_file())[:2]
    da = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(da)
    with pytest.raises(v.UserError, match=r"Cannot open run r\.zarr: .*'router/weights' does not match its committed"):
        v.open_cached(v.resolve_run(tmp_path, "r.zarr"))
