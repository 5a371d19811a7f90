"""A tokenizer's chat template, as a task uses it: prompts rendered once, replies appended.

An instruct model reads its conversation through its chat template (ChatML's
``<|im_start|>user ... <|im_end|>``, Llama-3's headers, Gemma's turns). A task
renders a chat prompt once, at reset, with the generation prompt (the opening of the
assistant's turn); from then on the state is token ids and nothing is rendered again.

- ``prompt_ids``: a chat (or a string, as one user message; with ``system_prompt`` a
  system message first) rendered with the generation prompt.
- ``end_of_turn_id``: the token the template closes an assistant's turn with, found by
  rendering a turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``): an episode ends
  there, whether or not the generation config lists it.
- ``user_turn_ids``: in a dialogue, the tokens that follow the assistant's turn when the
  env replies: the rest of the template's closing of the assistant's turn, the reply as a
  user turn, and the next generation prompt. They are what rendering the conversation
  again would add after the assistant's text, for templates that render every turn the
  same way wherever it stands (ChatML, Llama-3, Gemma). Templates that render earlier
  turns differently once a later one exists (some reasoning models drop the thinking
  block of past assistant turns) would give another text when rendered whole; the state
  here keeps what the model saw and sampled, which is what the policy was trained on.
"""

from __future__ import annotations

from typing import Any

from textenv.prompts import Chat, Prompt

MARKER = "Xq7ZMARKERz"  # a text no template writes: where the assistant's content is in a rendering


class ChatFormat:
    """``tokenizer``'s chat template for prompts and replies (module doc)."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"The tokenizer ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) has no chat template, "
                "so chat prompts ('messages', or chat_template=True) cannot be rendered. Fix: use an instruct model's "
                "tokenizer (one with a chat_template), or give string prompts without chat_template=True."
            )
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.end_of_turn_id, self.end_of_turn_text = self._assistant_turn_end()

    def messages(self, prompt: Prompt) -> Chat:
        """The chat of a prompt: a string as one user message; ``system_prompt`` first unless
        the chat has a system message of its own."""
        chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system_prompt is not None and not any(message["role"] == "system" for message in chat):
            chat = [{"role": "system", "content": self.system_prompt}, *chat]
        return chat

    def render(self, chat: Chat, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as error:  # jinja raises its own errors (e.g. a template without a system role)
            raise ValueError(f"The chat template could not render {chat!r}: {error}. Fix: give messages this "
                             "template accepts (some refuse a system message, or two user turns in a row).") from error

    def encode(self, text: str) -> list[int]:
        """Rendered text as ids (the template writes its special tokens itself)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt rendered with the generation prompt, as ids."""
        return self.encode(self.render(self.messages(prompt), add_generation_prompt=True))

    def user_turn_ids(self, reply: str, turn_closed: bool) -> list[int]:
        """What follows an assistant's turn when the env answers ``reply``: the template's
        closing of that turn (without the end-of-turn token when the turn already ended with
        it, ``turn_closed``), the reply as a user turn, and the next generation prompt: what
        rendering the conversation again would write after the assistant's text (module doc)."""
        before = [{"role": "user", "content": MARKER}, {"role": "assistant", "content": MARKER}]
        full = self.render([*before, {"role": "user", "content": reply}], add_generation_prompt=True)
        head = self.render(before, add_generation_prompt=False)
        end_of_content = full.rindex(MARKER) + len(MARKER)
        if full[:end_of_content] != head[: head.rindex(MARKER) + len(MARKER)]:
            raise ValueError("The chat template renders an earlier turn differently once a user turn follows it, so "
                             "a reply cannot be appended as tokens. Fix: use a template that renders each turn the "
                             "same way wherever it stands, or drop chat_template for a reply_template.")
        rest = full[end_of_content:]
        if turn_closed and self.end_of_turn_text and rest.startswith(self.end_of_turn_text):
            rest = rest[len(self.end_of_turn_text):]
        return self.encode(rest)

    def _assistant_turn_end(self) -> tuple[int, str]:
        """The token that closes an assistant's turn (the first the template writes after the
        assistant's content, when it is a special token; else the tokenizer's EOS) and its text."""
        rendered = self.render([{"role": "user", "content": MARKER}, {"role": "assistant", "content": MARKER}],
                               add_generation_prompt=False)
        ids = self.encode(rendered[rendered.rindex(MARKER) + len(MARKER):])
        special = set(self.tokenizer.all_special_ids) | set(getattr(self.tokenizer, "added_tokens_decoder", {}))
        if ids and ids[0] in special:
            return ids[0], self.tokenizer.decode([ids[0]])
        return self.tokenizer.eos_token_id, ""
