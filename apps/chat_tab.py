"""The Chat tab of the workbench app: wiring only.  Callbacks are the pure functions of
`apps.chat_views`; `apps.workbench_app.build_app` calls `chat_tab` inside its gr.Tabs.

Replies stream into the chatbot; every turn is recorded into the session's run, after which the
Runs tab's table and dropdown are refreshed.  Endpoints: `chat` (state, system, message, max new
tokens, temperature, image, chat model, prompt format) and `chat_open_run`.  The prompt format is
"chat" (the Llama 4 template) or "plain" (the message is the whole prompt); switching the chat model
sets the format to that model's default — "plain" for the bundled tiny-vlm — and the Message box's
placeholder to an example of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from apps import chat_views as cv
from apps import selection_sources as ss
from apps import views as v
from apps.checked_image import checked_image


def chat_tab(*, chat_models: dict, lock: threading.Lock, runs_dir: Path, session: gr.State,
             summary: gr.HTML, runs_df: gr.Dataframe, run_pick: gr.Dropdown, open_run: Callable,
             guard: Callable, wire: Callable, selected: gr.State | None = None) -> None:
    """Build the tab in the current gr.Tabs and wire its events.  `chat_models`: {"text": (model, source),
    optionally "vision": (model, source)}, run under `lock`; `runs_df`/`run_pick` (Runs tab) are
    refreshed after each turn; "Open this chat's run" sets `session` and `summary` with `open_run(name)`.
    `guard` turns exceptions into gr.Error; `wire(triggers, fn, inputs, outputs, api=…)` is the app's
    guarded `gr.on`.  `selected` (the app's linked selection): a token of the last turn's reply (the token
    strip, or a cell of the routing figure via the JS bridge) opens the chat's run and selects it there."""
    text_model, text_source = chat_models["text"]
    first_format = cv.default_format(text_model, text_source)
    with gr.Tab("Chat", id="chat"):
        chat_state = gr.State(None)      # this session's chat: run name, messages, turns
        gr.Markdown("### Chat with the live model\nEvery turn is recorded — routing and attention "
                    "entropy of the prompt and of each generated token — as one document of this "
                    "chat's run, which the Runs, Routing and Entropy tabs can open.")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=360, elem_id="chat-bot")
                chat_msg = gr.Textbox(label="Message", lines=2, max_length=v.MAX_PROMPT_CHARS,
                                      placeholder=cv.message_placeholder(text_model, text_source, first_format),
                                      elem_id="chat-msg")
                with gr.Row():
                    chat_send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    chat_reset = gr.Button("New chat", elem_id="chat-new")
                    chat_open = gr.Button("Open this chat's run", elem_id="chat-open")
            with gr.Column(scale=2):
                chat_with = gr.Radio([(f"{src} (text)" if k == "text" else f"{src} (vision)", k)
                                      for k, (_, src) in chat_models.items()], value="text",
                                     label="Chat model (switching starts a new chat)",
                                     visible=len(chat_models) > 1, elem_id="chat-model")
                chat_format = gr.Radio(cv.PROMPT_FORMATS, value=first_format,
                                       label="Prompt format (plain: the message is the whole prompt, no "
                                             "chat template, system prompt or history)", elem_id="chat-format")
                chat_mm = cv.is_multimodal(text_model)
                chat_image = checked_image(gr.Image(type="pil", label="Image for the next turn", height=160,
                                                    visible=chat_mm, elem_id="chat-image"))
                chat_image_note = gr.Markdown(cv.image_note(chat_mm, len(chat_models) > 1),
                                              elem_id="chat-image-note")
                chat_system = gr.Textbox(label="System prompt", lines=3, value=cv.DEFAULT_SYSTEM,
                                         max_length=v.MAX_PROMPT_CHARS, interactive=first_format == "chat",
                                         elem_id="chat-system")
                chat_new_tokens = gr.Slider(1, cv.MAX_REPLY_TOKENS, value=32, step=1,
                                            label="max new tokens", elem_id="chat-new-tokens")
                chat_temp = gr.Slider(0, cv.MAX_TEMPERATURE, value=0, step=0.05,
                                      label="temperature (0 = greedy)", elem_id="chat-temperature")
                chat_note = gr.Markdown("", elem_id="chat-note")
        chat_reply = gr.State(None)      # {"run", "base", "strip"}: the last turn's reply tokens, from index base
        chat_tokens = gr.HighlightedText(label="The reply's tokens (colour: expert at the first MoE layer) — "
                                               "click one to select it in every tab", show_legend=False,
                                         combine_adjacent=False, interactive=False, elem_id="chat-tokens")
        chat_patch = gr.Plot(label="The selected image token's patch (select an image token of this chat's run)",
                             visible=False, elem_id="chat-patch")
        chat_routing = gr.Plot(label="Routing of the generated tokens", elem_id="chat-routing")
        chat_entropy = gr.Plot(label="Attention entropy of the generated tokens", elem_id="chat-entropy")

    def chat_step(stream):           # one streamed update; None when done (errors pass through guard)
        return next(stream, None)

    def chat(state, system, message, max_new_tokens, temperature, image=None, which="text", prompt_format=None):
        """Streams the reply into the chatbot, then shows the turn's figures and refreshes the runs list.
        `prompt_format` None: the chat model's default."""
        m, src = chat_models.get(which or "text", chat_models["text"])
        stream = guard(cv.stream_turn)(m, lock, runs_dir, state, system, message, max_new_tokens,
                                       temperature, model_source=src, image=image, prompt_format=prompt_format)
        while (item := guard(chat_step)(stream)) is not None:
            text, turn = item
            if turn is None:
                yield {chatbot: cv.history(state, message, text, image), chat_msg: ""}
                continue
            routing_fig, entropy_fig = cv.turn_figures(m, turn)
            strip, base = guard(ss.chat_reply_tokens)(v.open_cached(v.resolve_run(runs_dir, turn.run)), turn.doc,
                                                      turn.recording.n_prompt, m.tokenizer)
            df = v.runs_table(runs_dir)
            yield {chatbot: cv.history(turn.session), chat_msg: "", chat_state: turn.session,
                   chat_note: cv.turn_note(turn), chat_routing: ss.chat_figure_meta(routing_fig, turn.run, base),
                   chat_entropy: ss.chat_figure_meta(entropy_fig, turn.run, base),
                   chat_reply: {"run": turn.run, "base": base, "strip": strip},
                   runs_df: df, run_pick: gr.update(choices=df["name"].tolist())}

    def chat_new():
        return cv.new_session(), [], "", None, None, None

    def select_reply_token(evt: gr.SelectData, reply, current):   # a click locks; the chat's run opens
        if not reply:
            raise v.UserError("Send a message first: the reply's tokens are selectable once recorded.")
        name, t = reply["run"], int(reply["base"]) + int(evt.index)
        opened = open_run(name) if name != current else (gr.update(), gr.update())
        return (*opened, ss.select_ref(f"{name}#{t}", name, lambda n: v.open_cached(v.resolve_run(runs_dir, n))))

    def chat_switch(which):
        mm = cv.is_multimodal(chat_models.get(which, chat_models["text"])[0])
        return (*chat_new(), gr.update(visible=mm, value=None), cv.image_note(mm, len(chat_models) > 1))

    def chat_format_hints(which, prompt_format):
        """The Message placeholder (the model's trained prompt in plain mode); the system prompt only
        applies to the chat template."""
        m, src = chat_models.get(which, chat_models["text"])
        return (gr.update(placeholder=cv.message_placeholder(m, src, prompt_format)),
                gr.update(interactive=prompt_format == "chat"))

    def chat_format_default(which):      # a newly chosen chat model starts in its own format
        m, src = chat_models.get(which, chat_models["text"])
        fmt = cv.default_format(m, src)
        return (gr.update(value=fmt), *chat_format_hints(which, fmt))

    def chat_open_run(state):
        name = (state or {}).get("run")
        if not name:
            raise v.UserError("Send a message first: the chat's run is created with its first turn.")
        return open_run(name)

    # the /chat endpoint's visible outputs stay as they were; the strip follows the chat_reply state
    chat_outputs = [chatbot, chat_msg, chat_state, chat_note, chat_routing, chat_entropy, chat_reply, runs_df, run_pick]
    gr.on([chat_send.click, chat_msg.submit], chat, [chat_state, chat_system, chat_msg, chat_new_tokens,
                                                     chat_temp, chat_image, chat_with, chat_format], chat_outputs,
          api_name="chat", concurrency_limit=2).success(
        lambda: None, None, [chat_image], api_visibility="undocumented")   # the image was sent: clear it
    chat_cleared = [chat_state, chatbot, chat_note, chat_routing, chat_entropy, chat_reply]
    wire([chat_reset.click], chat_new, None, chat_cleared)
    wire([chat_with.change], chat_switch, [chat_with], chat_cleared + [chat_image, chat_image_note])
    wire([chat_with.change], chat_format_default, [chat_with], [chat_format, chat_msg, chat_system])
    wire([chat_format.change], chat_format_hints, [chat_with, chat_format], [chat_msg, chat_system])
    wire([chat_open.click], chat_open_run, [chat_state], [session, summary], api="chat_open_run")
    def reply_strip(reply):
        return (reply or {}).get("strip")

    wire([chat_reply.change], reply_strip, [chat_reply], [chat_tokens])

    def selected_patch(sel, state):          # an image token of this chat's run selected anywhere: its patch
        name = (state or {}).get("run")
        if not isinstance(sel, dict) or sel.get("space", "run") != "run" or not name or sel.get("run") != name:
            return gr.update(value=None, visible=False)
        run = v.open_cached(v.resolve_run(runs_dir, name))
        patch = ss.run_image_patch(run, sel["token"])
        if patch is None:
            return gr.update(value=None, visible=False)
        images = ss.turn_images(state, patch["doc"], patch["prompt_format"])
        img = images[patch["image"]] if patch["image"] < len(images) else None
        fig = ss.image_patch_figure(img, patch)
        return gr.update(value=fig, visible=fig is not None)
    if selected is not None:
        wire([chat_tokens.select], select_reply_token, [chat_reply, session], [session, summary, selected])
        wire([selected.change], selected_patch, [selected, chat_state], [chat_patch])
