"""LLaVA-Rad's prompt, in one place: the instruction, the Vicuna v1 chat template (with its system prompt), and the
training text rendered from that template, so that what the model learns and what `apply_chat_template` builds at
inference are the same string by construction.

An exported folder carries the template (in its processor) and the instruction (`report_prompt.json`), so the Space
and any other client build the prompt from the folder alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment


IMAGE_TOKEN = "<image>"
EOS_TOKEN = "</s>"
INSTRUCTION = "Provide a description of the findings in the radiology image."
INSTRUCTION_WITH_INDICATION = (
    "Provide a description of the findings in the radiology image given the following indication: {indication}"
)
PROMPT_FILENAME = "report_prompt.json"
TEMPLATES = ("v1", "plain")
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Vicuna v1 (LLaVA's `conv_vicuna_v1`, SeparatorStyle.TWO with seps " " and "</s>"): "{system} USER: {user}
# ASSISTANT: {answer}</s>USER: ...". An image item renders as "<image>\n" ahead of the user's text, as LLaVA's
# `preprocess_multimodal` places it. The tokenizer adds <s>, so the template does not.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}{%- else -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- ' ' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
_TEMPLATE = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(VICUNA_V1_CHAT_TEMPLATE)


def build_instruction(indication: str | None = None) -> str:
    """LLaVA-Rad's instruction, with the indication (whitespace and newlines flattened) when there is one."""
    indication = " ".join(str(indication or "").split())
    return INSTRUCTION_WITH_INDICATION.format(indication=indication) if indication else INSTRUCTION


def user_message(instruction: str) -> dict:
    """The user turn of one study: the image, then the instruction (the chat-message format of transformers)."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The Vicuna v1 chat template applied to `messages`, as `processor.apply_chat_template(tokenize=False)` does."""
    return _TEMPLATE.render(messages=messages, add_generation_prompt=add_generation_prompt, eos_token=EOS_TOKEN)


def conversation_text(instruction: str, answer: str | None = None, template: str = "v1") -> tuple[str, str]:
    """(prompt, answer) strings of one turn; the tokenizer adds <s>.

    v1: both rendered from the chat template: "{system} USER: <image>\\n{instruction} ASSISTANT:" and
    " {answer}</s>". plain (alignment): "<image>" and "{answer}\\n"; the instruction is dropped, as LLaVA's plain
    template does.
    """
    if template == "v1":
        prompt = render_chat([user_message(instruction)], add_generation_prompt=True)
        if answer is None:
            return prompt, ""
        turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        full = render_chat([user_message(instruction), turn])
        if not full.startswith(prompt):
            raise RuntimeError("the chat template's generation prompt is not a prefix of the rendered turn.")
        return prompt, full[len(prompt) :]
    if template == "plain":
        return IMAGE_TOKEN, "" if answer is None else f"{answer}\n"
    raise ValueError(f"unknown template {template!r}; use one of {TEMPLATES}.")


def save_prompt(folder: str | os.PathLike) -> Path:
    """Write the instruction templates beside an exported model (`report_prompt.json`)."""
    path = Path(folder) / PROMPT_FILENAME
    record = {"instruction": INSTRUCTION, "instruction_with_indication": INSTRUCTION_WITH_INDICATION}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


__all__ = [
    "IMAGE_TOKEN",
    "INSTRUCTION",
    "INSTRUCTION_WITH_INDICATION",
    "PROMPT_FILENAME",
    "TEMPLATES",
    "VICUNA_V1_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM",
    "build_instruction",
    "conversation_text",
    "render_chat",
    "save_prompt",
    "user_message",
]
