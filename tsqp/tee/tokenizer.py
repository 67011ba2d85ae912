"""Text in and out of the TEE: the checkpoint's `tokenizer.json`, its chat template, its eos tokens.

Everything comes from the TEE's own model folder, never from the server. The tokenizer runs through
the `tokenizers` library and the chat template through a sandboxed Jinja2, the way transformers
renders it (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`);
transformers itself is not imported, so the enclave image need not carry it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from tsqp.errors import ModelError, TsqpError
from tsqp.model.config import ModelConfig, read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer checkpoints keep the template
GENERATION_CONFIG_FILE = "generation_config.json"


class TextTokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        folder = Path(model_dir)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise ModelError(f"{path} is missing: --prompt needs the checkpoint's tokenizer; pass --token-ids instead")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exceptions on a bad file
            raise ModelError(f"{path} is not a valid tokenizer.json ({exc})") from None
        config = read_json(folder / TOKENIZER_CONFIG_FILE) if (folder / TOKENIZER_CONFIG_FILE).is_file() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template_file = folder / CHAT_TEMPLATE_FILE
        self.chat_template = template_file.read_text() if template_file.is_file() else _default_template(config)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens (bos) come from tokenizer.json's post-processor, as in transformers."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt_ids(self, user_message: str) -> list[int]:
        """The chat template rendered for one user turn, tokenized without adding special tokens again
        (the template writes bos itself when it wants one, as transformers' apply_chat_template assumes)."""
        return self.encode(self.render_chat([{"role": "user", "content": user_message}]), add_special_tokens=False)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise ModelError(f"the checkpoint has no chat template in {TOKENIZER_CONFIG_FILE}: drop --chat")

        def raise_exception(message: str):
            raise TsqpError(f"the chat template refused the conversation: {message}")

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.globals.update(
            raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt)
        )
        try:
            template = environment.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise ModelError(f"the chat template of the checkpoint cannot be rendered: {exc}") from None


def eos_token_ids(model_dir: str | Path, config: ModelConfig) -> tuple[int, ...]:
    """Stop tokens: generation_config.json's eos_token_id (int or list) when it has one, else config.json's.

    transformers' generate uses the same precedence, so both stop on the same tokens.
    """
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    value = read_json(path).get("eos_token_id") if path.is_file() else None
    if value is None:
        return config.eos_token_ids
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelError(f"{path}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return tuple(values)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken map with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _default_template(config: dict) -> str | None:
    """`chat_template` is a string, or a list of named templates of which `default` is the chat one."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
