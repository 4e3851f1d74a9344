r"""Prompt templates (SimpleRL-Zoo's formats), shared by RL prompts, SFT examples and evaluation.

A template is chosen by name (a config string):

| name | form | for |
|---|---|---|
| `qwen-boxed` | system "You are a helpful assistant." + user `{question}\n<boxed instruction>` | Qwen2.5 base/instruct (default) |
| `qwen-math-cot` | system `<boxed instruction>` + user `{question}` | Qwen2.5-Math |
| `abel` | plain text `Question:\n{question}\nAnswer:\nLet's think step by step.\n` | non-Qwen base models |
| `chat` | user `{question}\n<boxed instruction>`, no system, the tokenizer's own chat template | instruct models, e.g. Llama-3.2-3B-Instruct |

Conversational templates return a list of messages (TRL's conversational format; the trainer applies the
tokenizer's chat template). The Qwen templates pass their system message explicitly so that Qwen's
default system prompt never slips in and training, SFT and evaluation see identical prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt format: an optional system message and a user turn, or a plain-text prompt."""

    name: str
    user: str  # with a `{question}` field
    system: str | None = None
    conversational: bool = True

    def format(self, question: str) -> str | list[dict[str, str]]:
        text = self.user.replace("{question}", question)  # not str.format: questions are full of braces
        if not self.conversational:
            return text
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*messages, {"role": "user", "content": text}]


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            "qwen-boxed", "{question}\n" + BOXED_INSTRUCTION, system="You are a helpful assistant."
        ),
        PromptTemplate("qwen-math-cot", "{question}", system=BOXED_INSTRUCTION),
        PromptTemplate(
            "abel", "Question:\n{question}\nAnswer:\nLet's think step by step.\n", conversational=False
        ),
        PromptTemplate("chat", "{question}\n" + BOXED_INSTRUCTION),
    )
}
DEFAULT_TEMPLATE = "qwen-boxed"


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """The template called `template`; a ValueError lists the valid names."""
    if isinstance(template, PromptTemplate):
        return template
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"Unknown prompt template {template!r}; valid names: {', '.join(PROMPT_TEMPLATES)}.")
    return PROMPT_TEMPLATES[template]


def format_prompt(
    question: str, template: str | PromptTemplate = DEFAULT_TEMPLATE
) -> str | list[dict[str, str]]:
    """The prompt for `question`: a list of messages for conversational templates, a string for `abel`."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"A prompt needs a non-empty question string, got {question!r}.")
    return get_template(template).format(question.strip())


def format_completion(
    trace: str, template: str | PromptTemplate = DEFAULT_TEMPLATE
) -> str | list[dict[str, str]]:
    """An SFT completion in the same format as the template's prompt: a string, or one assistant message."""
    if get_template(template).conversational:
        return [{"role": "assistant", "content": trace}]
    return trace


def render_prompt(prompt: str | list[dict[str, str]], tokenizer) -> str:
    """The text a model is fed for `prompt`: the chat template with the generation prompt, or the string."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
