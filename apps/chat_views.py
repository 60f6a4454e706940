"""Pure callbacks of the Chat tab: a chat with the live model in which every turn is recorded.

A chat session is a plain dict (kept in the browser session's gr.State):

    {"run": "chat-….zarr" | None, "messages": [{"role": "user"|"assistant", "content": str | items}, …],
     "turns": n, "model": model source of the run | None}

Images (a multimodal chat model): a turn may carry one image; the user message becomes the items
[image, text] — or, when the text holds `<|image|>`, [text before, image, text after], so prompts in
a model's trained format ("Question: …\n<|image|>\nAnswer:") work — and the image stays in the
session, so every later turn re-sends it (the whole conversation is the prompt of each turn).  The
turn's document holds the expanded image tokens; the pixels enter with the prefill only
(`workbench.chat.prepare_chat`).  A session is bound to the model of its first turn.

Prompt formats: "chat" renders [system] + messages + the new user message with the Llama 4 chat
template; "plain" sends the new message's text alone as the whole prompt (no headers, no system
prompt, no history: `workbench.chat.render_plain`), its image where it says `<|image|>` or before the
text; a plain message that says `<|image|>` but brings no image gets the chat's last image (a plain
prompt carries no history, and the image upload clears after each turn).  "plain" is the default for
models trained on raw prompts — the bundled tiny-vlm learned `Question: …\n<|image|>\nAnswer:`
(`workbench.train.vlm`) and answers `<|eot|>` at once to the template.

Each turn renders its prompt in the chosen format, generates the reply with
`workbench.live.chat_recorded` (routing and attention entropy of the prompt *and* of every generated
token, one forward per token) and appends it as one document ("turn-<n>", domain "chat", tokens =
prompt + reply; the run's `generations` note names the format) to the session's run in the runs
directory, so the Runs, Routing and Entropy tabs can open it.  One run per session, under a fresh
unguessable name.

Streaming: `stream_turn` runs the turn in a worker thread that holds the model lock and pushes text
pieces into a queue; the generator yields the growing reply.  If the browser goes away the worker
still finishes (at most `max_new_tokens` steps), writes the turn and releases the lock.

Nothing here imports gradio; `UserError` (from apps.views) carries messages for the person at the
browser.  Reply text reaches the page through gr.Chatbot (which sanitizes HTML); token strings in
figures go through `probes.teaching.display_token`.
"""

from __future__ import annotations

import datetime as _dt
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from apps import private_runs
from apps import views as v
from probes import routing_figures as rf
from probes import teaching as pt

MAX_REPLY_TOKENS = 256
MAX_TEMPERATURE = 2.0
MAX_IMAGE_PIXELS = 16_000_000          # as the Attribution tab's uploads
IMAGE = "<|image|>"
CHAT_PROBES = v.LIVE_PROBES            # as the Runs tab's live prompt: router (+ logits, norms), entropy, sink
DEFAULT_SYSTEM = "You are a helpful assistant."
PROMPT_FORMATS = [("chat template", "chat"), ("plain", "plain")]      # (label, value) for the UI
PLAIN_MODELS = ("tiny-vlm", "tiny-moe")   # trained on raw text, never on the chat template (train/)
PLAIN_EXAMPLE = "Question: What colour is the square?\n<|image|>\nAnswer:"    # tiny-vlm's trained format


def new_session() -> dict:
    return {"run": None, "messages": [], "turns": 0, "model": None}


def is_multimodal(model) -> bool:
    return hasattr(model, "vision_model")


def user_content(text: str, image=None) -> str | list[dict]:
    """The user message: plain text, or image + text items (the image where the text says `<|image|>`)."""
    if image is None:
        return text
    if text.count(IMAGE) > 1:
        raise v.UserError(f"The message has {text.count(IMAGE)} {IMAGE} markers; a turn carries one image.")
    before, mark, after = text.partition(IMAGE)
    if not mark:
        before, after = "", text
    items = [{"type": "text", "text": before}] if before else []
    return items + [{"type": "image", "image": image}] + ([{"type": "text", "text": after}] if after else [])


def default_format(model, source: str | None = None) -> str:
    """"plain" for a model trained on raw prompts (its `source`, or the app's name for it, is in
    PLAIN_MODELS), else "chat"."""
    return "plain" if {getattr(model, "source", None), source} & set(PLAIN_MODELS) else "chat"


def message_placeholder(model, source: str | None, prompt_format: str) -> str:
    """The Message box's placeholder: the model's trained prompt in plain mode."""
    if prompt_format != "plain":
        return ""
    if default_format(model, source) == "plain":
        return PLAIN_EXAMPLE
    return f"The whole prompt, exactly as the model reads it (an image goes where it says {IMAGE}, else first)."


def _format(model, source: str, prompt_format: str | None) -> str:
    fmt = prompt_format or default_format(model, source)
    if fmt not in dict(PROMPT_FORMATS).values():
        raise v.UserError(f"Unknown prompt format {fmt!r}; choose one of {[f for _, f in PROMPT_FORMATS]}.")
    return fmt


def _last_image(session: dict):
    from workbench.chat import chat_images

    images = chat_images(session["messages"])
    return images[-1] if images else None


def image_note(multimodal: bool, can_switch: bool) -> str:
    """The line under the Chat tab's image upload."""
    if multimodal:
        return (f"An image goes before your message, or where it says `{IMAGE}`; it stays in the conversation "
                f"(plain prompts: a later message that says `{IMAGE}` reuses it). Its image tokens are recorded "
                "with the turn.")
    if can_switch:
        return "To chat about an image, choose the vision model above (a new chat starts)."
    return ("Images need a vision model; this app's chat model is text-only. Launch with "
            "`workbench app --vision-model tiny-vlm` (or `--model tiny-vision`).")


def _check_image(model, image, source: str):
    """The image as a validated RGB PIL image (None stays None), or UserError."""
    if image is None:
        return None
    if not is_multimodal(model):
        raise v.UserError(f"Images need a vision model: this chat runs {source or 'a text-only model'}, which has "
                          "no vision tower. Launch the app with --vision-model (e.g. tiny-vlm) to chat about images.")
    from workbench.image import ImageError, load_image

    try:
        return load_image(image, max_pixels=MAX_IMAGE_PIXELS, name="upload")
    except ImageError as e:
        raise v.UserError(str(e)) from None


def chat_run_name() -> str:
    """A fresh, unguessable run name: concurrent sessions never write into each other's runs."""
    return f"chat-{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}.zarr"


@dataclass
class ChatTurn:
    session: dict                 # the session after this turn
    reply: object                 # workbench.chat.ChatReply
    recording: object             # workbench.live.RecordedGeneration (prompt + reply)
    run: str                      # run name inside the runs directory
    doc: int                      # the turn's document index in that run


def _check(model, session, system, message, max_new_tokens, temperature, image=None,
           source: str = "", prompt_format: str = "chat") -> tuple[dict, list[dict], int, float]:
    session = dict(session or new_session())
    text = (message or "").strip()
    if not text and image is None:
        raise v.UserError("Type a message first.")
    if session["run"] and session.get("model") not in (None, source):
        raise v.UserError(f"This chat is recorded with {session['model']}; start a new chat to talk to {source}.")
    for what, s in (("message", text), ("system prompt", system or "")):
        if len(s) > v.MAX_PROMPT_CHARS:
            raise v.UserError(f"The {what} has {len(s)} characters; the limit is {v.MAX_PROMPT_CHARS}.")
    if model.tokenizer is None:
        raise v.UserError("This model has no tokenizer, so it cannot chat.")
    try:
        n_new, temp = int(max_new_tokens), float(temperature)
    except (TypeError, ValueError):
        raise v.UserError(f"Max new tokens and temperature must be numbers, got {max_new_tokens!r}, "
                          f"{temperature!r}.") from None
    if not 1 <= n_new <= MAX_REPLY_TOKENS:
        raise v.UserError(f"Max new tokens must be between 1 and {MAX_REPLY_TOKENS}, got {n_new}.")
    if not 0 <= temp <= MAX_TEMPERATURE:
        raise v.UserError(f"Temperature must be between 0 and {MAX_TEMPERATURE}, got {temp}.")
    image = _check_image(model, image, source)
    if prompt_format == "plain" and image is None and IMAGE in text:
        image = _last_image(session)          # a plain prompt has no history: bring the chat's image along
    system = (system or "").strip()
    messages = ([{"role": "system", "content": system}] if system else []) + list(session["messages"]) \
        + [{"role": "user", "content": user_content(text, image)}]
    from workbench.chat import prepare_chat

    try:
        n_prompt = len(prepare_chat(model, messages, prompt_format=prompt_format).ids)   # expands, checks images
    except ValueError as e:                                    # workbench.image.ImageError included
        raise v.UserError(str(e)) from None
    if n_prompt > v.MAX_PROMPT_TOKENS:
        raise v.UserError(f"The conversation is {n_prompt} tokens; the limit is {v.MAX_PROMPT_TOKENS}. "
                          "Start a new chat" + (" or send a smaller image (each tile is a block of image tokens)."
                                                if image is not None else "."))
    return session, messages, n_new, temp


def _source(model, model_source) -> str:
    return str(model_source or getattr(model, "source", ""))


def chat_turn(model, lock: threading.Lock, runs_dir: str | Path, session: dict | None, system: str, message: str,
              max_new_tokens: int = 64, temperature: float = 0.0, *, on_text: Callable[[str], None] | None = None,
              model_source: str | None = None, image=None, prompt_format: str | None = None) -> ChatTurn:
    """One recorded turn: reply to `message` (with `image`, a PIL image or path, on a multimodal model)
    and append prompt + reply to the session's run.  `prompt_format`: "chat" or "plain" (see the module
    doc); None: the model's default (`default_format`)."""
    from workbench.live import chat_recorded

    source = _source(model, model_source)
    fmt = _format(model, source, prompt_format)
    session, messages, n_new, temp = _check(model, session, system, message, max_new_tokens, temperature, image,
                                            source, fmt)
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    name = session["run"] or private_runs.new_name(chat_run_name())     # private to this session
    with lock:
        # the document index comes from the run, not the session: a turn whose page went away
        # mid-stream was still written, and the next turn must not reuse its id
        doc = v.open_cached(v.resolve_run(runs_dir, name)).n_docs if session["run"] else 0
        reply, rec = chat_recorded(model, messages, n_new, out=private_runs.path_for(runs_dir, name),
                                   doc_id=f"turn-{doc}",
                                   domain="chat", probes=CHAT_PROBES, temperature=temp, on_text=on_text,
                                   model_source=source, prompt_format=fmt)
    session.update(run=name, turns=session["turns"] + 1, model=source,
                   messages=list(session["messages"]) + [messages[-1], {"role": "assistant", "content": reply.text}])
    return ChatTurn(session, reply, rec, name, doc)


def stream_turn(model, lock: threading.Lock, runs_dir: str | Path, session: dict | None, system: str, message: str,
                max_new_tokens: int = 64, temperature: float = 0.0, *, model_source: str | None = None,
                image=None, prompt_format: str | None = None) -> Iterator[tuple[str, ChatTurn | None]]:
    """Validate now (so a bad request raises before anything runs), then return a generator of
    (reply text so far, None) while the reply streams and, last, (reply text, ChatTurn)."""
    source = _source(model, model_source)
    _check(model, session, system, message, max_new_tokens, temperature, image, source,
           _format(model, source, prompt_format))
    q: queue.Queue = queue.Queue()

    def work():
        try:
            q.put(("done", chat_turn(model, lock, runs_dir, session, system, message, max_new_tokens, temperature,
                                     on_text=lambda piece: q.put(("text", piece)), model_source=model_source,
                                     image=image, prompt_format=prompt_format)))
        except BaseException as e:          # re-raised in the consumer's thread
            q.put(("error", e))

    threading.Thread(target=work, name="chat-turn", daemon=True).start()

    def pieces():
        text = ""
        while True:
            items = [q.get()]
            while not q.empty():            # coalesce what arrived meanwhile: one UI update per batch
                items.append(q.get_nowait())
            for kind, x in items:
                if kind == "error":
                    raise x
                if kind == "done":
                    yield x.reply.text, x
                    return
                text += x
            yield text, None
    return pieces()


def display_content(content) -> str:
    """A message's text for the chatbot; an image shows as `[image W×H]` where it sits."""
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") if item.get("type") == "text" else
                   "[image {}×{}] ".format(*getattr(item.get("image"), "size", ("?", "?"))) for item in content)


def history(session: dict | None, message: str | None = None, partial: str | None = None,
            image=None) -> list[dict]:
    """Chatbot messages: the session's turns, plus a pending user message (and its image) and partial reply."""
    msgs = (session or new_session())["messages"]
    out = [{"role": m["role"], "content": display_content(m["content"])} for m in msgs]
    if message is not None:
        text = (message or "").strip()
        out.append({"role": "user", "content": display_content(user_content(text, image)) if image is not None
                    else text})
    if partial is not None:
        out.append({"role": "assistant", "content": partial})
    return out


def turn_note(turn: ChatTurn) -> str:
    rec = turn.recording
    stop = f"stopped at `{turn.reply.stop}`" if turn.reply.stop else "stopped at max new tokens"
    tiles = rec.settings.get("image_tiles")
    images = f" (image tokens included; {tiles} image tiles entered with the prefill)" if tiles else ""
    plain = " Plain prompt: the message alone, no chat template." if rec.settings.get("prompt_format") == "plain" \
        else ""
    return (f"Turn recorded in run **{turn.run}** as document {turn.doc} (`turn-{turn.doc}`): "
            f"{rec.n_prompt} prompt{images} + {len(rec.new_ids)} generated tokens, {stop}.{plain} Open the run "
            "(button, or "
            f"the Runs tab) to explore it in the Routing and Entropy tabs.")


def turn_figures(model, turn: ChatTurn) -> tuple[go.Figure | None, go.Figure | None]:
    """The generated tokens' routing (first-choice expert per token × MoE layer) and attention entropy
    per generated token (mean over heads, one line per layer); None where nothing was generated."""
    rec, cfg = turn.recording, model.config
    if not rec.new_ids:
        return None, None
    labels = [pt.display_token(s) for s in v.token_text(model.tokenizer, rec.new_ids)]
    routing = None
    if "router/experts" in rec.arrays:
        routing = rf.expert_grid_figure(rec.generated("router/experts")[..., 0],       # (M, t)
                                        rec.generated("router/weights")[..., 0], labels,
                                        layer_labels=cfg.moe_layer_index, n_experts=cfg.num_local_experts)
        routing.update_layout(title=f"Generated tokens: expert per MoE layer (turn {turn.doc})",
                              yaxis_title="MoE layer")
    entropy = None
    if "attention/entropy" in rec.arrays:
        h = rec.generated("attention/entropy").mean(axis=1)             # (L, t): mean over heads
        kinds = cfg.layer_kinds()
        x = np.arange(h.shape[1])
        entropy = go.Figure([go.Scatter(x=x, y=h[i], mode="lines+markers", name=f"layer {i} ({kinds[i]})",
                                        customdata=labels,
                                        hovertemplate=f"%{{customdata}}: H=%{{y:.3f}}<extra>layer {i}</extra>")
                             for i in range(h.shape[0])])
        if len(x) <= 80:
            entropy.update_xaxes(tickmode="array", tickvals=x, ticktext=labels, tickangle=-60)
        entropy.update_layout(title=f"Attention entropy per generated token, mean over heads (turn {turn.doc})",
                              xaxis_title="generated token", yaxis_title="entropy H (nats)")
    return routing, entropy
