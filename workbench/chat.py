"""The Llama 4 chat format (spec llama4.md §7.3), rendered from messages in plain Python, and chat
generation that stops on the end-of-turn tokens.

    <|begin_of_text|><|header_start|>system<|header_end|>\\n\\n{system}<|eot|>
    <|header_start|>user<|header_end|>\\n\\n{text or <|image|>…}<|eot|>
    <|header_start|>assistant<|header_end|>\\n\\n<|python_start|>…<|python_end|>{"name": …, "parameters": …}<|eot|>
    <|header_start|>ipython<|header_end|>\\n\\n{tool result as JSON}<|eot|>
    <|header_start|>assistant<|header_end|>\\n\\n                                    ← generation prompt

`render_chat` reproduces the Hugging Face template (the `chat_template` string in transformers'
`models/llama4/processing_llama4.py`, copied verbatim to tests/fixtures/llama4_chat_template.jinja)
character for character, quirks included — tests render a set of conversations through both:
  * a system message is emitted only when given; its text is stripped; with tools it gains
    "Environment: ipython"; tools go into the first user message by default (`tools_in_user_message`),
    whose text is then stripped too;
  * the tool role is written as "ipython" and its content is always JSON-encoded (a plain string
    becomes a quoted JSON string — Jinja's `is iterable` is true for strings);
  * an assistant message with an *empty* `tool_calls` list renders nothing at all;
  * image items become `<|image|>`; items of any other type than "text"/"image" are dropped.
One deliberate difference: where the template `trim`s the first user message for tools and that
message's content is a list, Jinja stringifies the Python list (a bug); we render its items.
`eom_for_tool_calls=True` follows Meta's `chat_format.py` instead of HF: assistant turns that call a
tool end with `<|eom|>` (the model expects a tool result, not the end of its turn).

Images (a multimodal model): an item {"type": "image", "image": PIL image | path} renders as
`<|image|>`; `prepare_chat` then expands each placeholder into its tile tokens with
`workbench.image.prepare` and returns the pixel values, which go with the prefill only (decode steps
run as text, as HF's `generate` does). Items without data (HF style `{"type": "image"}`) take the
`images=` argument instead, in order; the counts must match.

Plain prompts (`prompt_format="plain"`): a model trained on raw text rather than on this format — the
bundled `tiny-vlm` learned `Question: {q}\n<|image|>\nAnswer:` → ` {answer}<|eot|>`
(`workbench.train.vlm`) — is prompted with `<|begin_of_text|>` + the last message's text and nothing
else: no headers, no system prompt, no earlier turns, no generation prompt. Its image items still
render as `<|image|>` where they sit, and only that message's images enter (`render_plain`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BOS, EOT, EOM, EOS = "<|begin_of_text|>", "<|eot|>", "<|eom|>", "<|end_of_text|>"
STOP_TOKENS = (EOT, EOM, EOS)
PROMPT_FORMATS = ("chat", "plain")     # the Llama 4 chat template; the last message as the whole prompt
_TOOLS_USER = ("Given the following functions, please respond with a JSON for a function call "
               "with its proper arguments that best answers the given prompt.\n\n")
_TOOLS_SYSTEM = ("You have access to the following functions. "
                 "To call a function, please respond with JSON for a function call.")
_FORMAT = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'


def _header(role: str) -> str:
    return f"<|header_start|>{role}<|header_end|>\n\n"


def _content(content) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise ValueError("message content is None; use '' for an empty message")
    out = []
    for item in content:
        if item.get("type") == "image":
            out.append("<|image|>")
        elif item.get("type") == "text":
            out.append(item["text"])
    return "".join(out)


def _tojson(x, indent=None) -> str:           # transformers' tojson filter: no HTML escaping, keys unsorted
    return json.dumps(x, ensure_ascii=False, indent=indent)


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
                tools_in_user_message: bool = True, bos_token: str = BOS, eom_for_tool_calls: bool = False) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": str | [{"type": "text"|"image", ...}]}],
    assistant messages may carry "tool_calls": [{"function": {"name", "arguments"}}])."""
    messages = list(messages)
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"each message must be a dict with a 'role', got {m!r}")
    out = [bos_token]
    if messages and messages[0]["role"] == "system":
        c = messages[0]["content"]
        system = (c if isinstance(c, str) else c[0]["text"]).strip()
        messages = messages[1:]
        out.append(_header("system"))
        if tools is not None:
            out.append("Environment: ipython\n")
        if tools is not None and not tools_in_user_message:
            out.append(_TOOLS_SYSTEM + _FORMAT + "Do not use variables.\n\n")
            out += [_tojson(t, indent=4) + "\n\n" for t in tools]
        out.append(system + EOT)
    if tools_in_user_message and tools is not None:
        if not messages:
            raise ValueError("Cannot put tools in the first user message when there's no first user message!")
        first, messages = _content(messages[0]["content"]).strip(), messages[1:]
        out.append(_header("user") + _TOOLS_USER + _FORMAT + "Do not use variables.\n\n")
        out += [_tojson(t, indent=4) + "\n\n" for t in tools]
        out.append(first + EOT)
    for m in messages:
        role = m["role"]
        if role in ("ipython", "tool"):
            c = m["content"]
            body = _tojson(c) if isinstance(c, (str, dict, list, tuple)) else str(c)
            out.append(_header("ipython") + body + EOT)
        elif "tool_calls" in m:
            if not m["tool_calls"]:
                continue                      # the HF template drops such a message entirely
            calls = "".join('{"name": "' + tc["function"]["name"] + '", "parameters": '
                            + _tojson(tc["function"]["arguments"]) + "}" for tc in m["tool_calls"])
            end = EOM if eom_for_tool_calls else EOT
            out.append(_header("assistant") + "<|python_start|>" + _content(m["content"]) + "<|python_end|>"
                       + calls + end)
        else:
            out.append(_header(role) + _content(m["content"]) + EOT)
    if add_generation_prompt:
        out.append(_header("assistant"))
    return "".join(out)


def render_plain(messages: Sequence[dict], *, bos_token: str = BOS) -> str:
    """The prompt text of a plain (raw-prompt) turn: `bos_token` + the last message's text, image items as
    `<|image|>` where they sit. Roles, system prompt and earlier messages are not rendered: a model
    trained on plain prompts has never seen them."""
    messages = list(messages)
    if not messages:
        raise ValueError("a plain prompt needs a message; got none")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        raise ValueError(f"a plain prompt is the last message, which must be a user message, got {last!r}")
    return bos_token + _content(last["content"])


def encode_chat(tokenizer, messages: Sequence[dict], **kwargs) -> list[int]:
    """Token ids of `render_chat(messages, **kwargs)`; special tokens in the text become their ids."""
    return tokenizer.encode(render_chat(messages, **kwargs), add_bos=False)


def chat_stop_ids(model) -> list[int]:
    """Stop tokens: `eos_token_id` of the checkpoint's generation_config.json when there is one (the
    Instruct releases list <|end_of_text|>, <|eom|>, <|eot|>), else those three tokens by name."""
    source = getattr(model, "source", None)
    gen = Path(source) / "generation_config.json" if source else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [eos]
    tok = model.tokenizer
    ids = [tok.token_to_id(t) for t in STOP_TOKENS]
    if any(i is None for i in ids):
        missing = [t for t, i in zip(STOP_TOKENS, ids) if i is None]
        raise ValueError(f"the tokenizer has no {missing}: not a Llama 4 tokenizer")
    return ids


@dataclass
class ChatReply:
    text: str                         # the assistant's text, stop token excluded
    ids: list[int]                    # generated ids, stop token included when one was hit
    stop: str | None                  # "<|eot|>", "<|eom|>", "<|end_of_text|>", or None (hit max_new_tokens)
    prompt_ids: list[int] = field(repr=False, default_factory=list)

    @property
    def message(self) -> dict:
        """The reply as a message to append to the conversation."""
        return {"role": "assistant", "content": self.text}


def chat_images(messages: Sequence[dict]) -> list:
    """The images carried by the messages' image items ("image": a PIL image or a path), in order."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, (list, tuple)):
            out += [item["image"] for item in content
                    if isinstance(item, dict) and item.get("type") == "image" and item.get("image") is not None]
    return out


@dataclass
class ChatInputs:
    ids: list[int]                           # the rendered prompt, image placeholders expanded
    stops: list[int]
    pixel_values: torch.Tensor | None = None  # (N_tiles, 3, S, S) for the prefill; None without images
    prepared: object = None                   # workbench.image.Prepared (layouts, patch map) with images


def prepare_chat(model, messages: Sequence[dict], *, images: Sequence | None = None,
                 stop_ids: Sequence[int] | None = None, tools: list[dict] | None = None,
                 prompt_format: str = "chat", **render_kwargs) -> ChatInputs:
    """Render `messages` and tokenize them; with images (items carrying them, or `images=` for items
    that do not), expand every `<|image|>` and process the images for a multimodal model.
    `prompt_format="plain"`: the last message alone, no template (`render_plain`); only its images."""
    from workbench.image import TOKENS, prepare

    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer; chat needs one")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "plain":
        if tools is not None or render_kwargs:
            raise ValueError(f"a plain prompt has no template: tools and {sorted(render_kwargs)} do not apply")
        messages = list(messages)[-1:]                       # render_plain's message, and only its images
    carried = chat_images(messages)
    if carried and images is not None:
        raise ValueError(f"the messages carry {len(carried)} image(s) and images= gives {len(images)} more; "
                         "give the images one way")
    imgs = carried if images is None else list(images)
    text = render_plain(messages) if prompt_format == "plain" else \
        render_chat(messages, tools=tools, **render_kwargs)
    stops = list(chat_stop_ids(model) if stop_ids is None else stop_ids)
    n_slots = text.count(TOKENS["image"])
    if not n_slots and not imgs:
        return ChatInputs(model.tokenizer.encode(text, add_bos=False), stops)
    if not hasattr(model, "vision_model"):
        raise ValueError(f"the conversation contains images ({len(imgs)} given, {n_slots} {TOKENS['image']} "
                         "placeholders) but this model is text-only: images need a multimodal model with a "
                         "vision tower (e.g. tiny-vision or tiny-vlm)")
    processor = getattr(model, "image_processor", None) or model.config
    p = prepare(text, imgs, model.tokenizer, processor, add_bos=False)       # the text carries <|begin_of_text|>
    return ChatInputs(p.input_ids[0].tolist(), stops, p.pixel_values, p)


def chat_prompt(model, messages: Sequence[dict], *, stop_ids: Sequence[int] | None = None,
                tools: list[dict] | None = None, **render_kwargs) -> tuple[list[int], list[int]]:
    """(prompt ids, stop ids) for a text-only chat turn; refuses images (they need `prepare_chat`,
    which also returns their pixel values)."""
    c = prepare_chat(model, messages, stop_ids=stop_ids, tools=tools, **render_kwargs)
    if c.pixel_values is not None:
        raise ValueError("the conversation contains images; use prepare_chat, which returns their pixel values")
    return c.ids, c.stops


class _PrefillImages:
    """`model` whose first forward — `generate`'s prefill, which holds every `<|patch|>` token — also
    receives the pixel values; later forwards (decode steps) run as text."""

    def __init__(self, model, pixel_values: torch.Tensor):
        self._model, self._pixel_values = model, pixel_values

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, ids, **kw):
        pv, self._pixel_values = self._pixel_values, None
        return self._model(ids, pv, **kw)


class TextStream:
    """Generated ids → text pieces for `on_text`, called with one id at a time. A piece waits for the
    rest of a split UTF-8 character; stop ids are not shown; after `close()` the pieces concatenate
    to the reply's text."""

    def __init__(self, tokenizer, stops: Sequence[int], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stops, self.on_text = tokenizer, set(stops), on_text
        self.ids: list[int] = []
        self._shown = 0

    def __call__(self, tok: int) -> None:
        self.ids.append(tok)
        if self.on_text is None or tok in self.stops:
            return
        text = self.tokenizer.decode(self.ids, skip_special=False)
        if not text.endswith("\ufffd"):          # wait for the rest of a multi-byte character
            self.on_text(text[self._shown:])
            self._shown = len(text)

    def close(self, prompt_ids: Sequence[int] = ()) -> ChatReply:
        """The reply; flushes a trailing incomplete character to `on_text`."""
        new = self.ids
        hit = new[-1] if new and new[-1] in self.stops else None
        body = new[:-1] if hit is not None else new
        stop = self.tokenizer.decode([hit], skip_special=False) if hit is not None else None
        text = self.tokenizer.decode(body, skip_special=False)
        if self.on_text is not None and text[self._shown:]:
            self.on_text(text[self._shown:])
            self._shown = len(text)
        return ChatReply(text, list(new), stop, list(prompt_ids))


def chat_generate(model, messages: Sequence[dict], max_new_tokens: int = 256, *, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] | None = None,
                  on_text: Callable[[str], None] | None = None, tools: list[dict] | None = None,
                  images: Sequence | None = None, **render_kwargs) -> ChatReply:
    """Render `messages`, generate the assistant's reply, stop at <|eot|>/<|eom|>/<|end_of_text|>.
    `on_text(piece)` streams decoded text as it is produced; a piece waits for the rest of a split
    UTF-8 character, and the pieces concatenate to the reply's text. Images and `prompt_format="plain"`
    (the last message as the whole prompt, no template) as `prepare_chat`.
    (`workbench.live.chat_recorded` is the same turn with routing and entropy recorded into a run.)"""
    from workbench.generation import generate

    c = prepare_chat(model, messages, images=images, stop_ids=stop_ids, tools=tools, **render_kwargs)
    stream = TextStream(model.tokenizer, c.stops, on_text)
    runner = model if c.pixel_values is None else _PrefillImages(model, c.pixel_values)
    generate(runner, [c.ids], max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
             stop_ids=c.stops, on_token=lambda _b, tok: stream(tok))
    return stream.close(c.ids)
