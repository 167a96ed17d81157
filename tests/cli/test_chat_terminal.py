"""``fuselm chat`` in a real terminal (tmux): arrow keys edit the line, Ctrl-C stops an answer
and returns to the prompt with the history kept, Ctrl-C with text drops the text, Ctrl-C at an
empty prompt ends the chat with status 0."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fuselm.bench.dummy_model import write_dummy_checkpoint

TMUX = "/usr/bin/tmux"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny random model whose every token prints as one visible character: the byte-level
    tokenizer without its byte decoder shows each token as its (printable) alphabet symbol,
    so no random byte can move the terminal's cursor."""
    from tokenizers import Tokenizer

    path = write_dummy_checkpoint(
        "llama-tiny", tmp_path_factory.mktemp("chat") / "model", vocab_size=258,
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.decoder = None
    tok.save(str(path / "tokenizer.json"))
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")
    return path


class Terminal:
    """One tmux session on a private socket, running a command in a 160x50 pane."""

    def __init__(self, socket: Path, command: str) -> None:
        self.base = [TMUX, "-S", str(socket)]
        subprocess.run([*self.base, "new-session", "-d", "-s", "t", "-x", "160", "-y", "50",
                        command], check=True, timeout=30)

    def keys(self, *keys: str) -> None:
        """Sends tmux key names (``Left``, ``C-c``) or text; a pause after each, as a typist
        makes (a Ctrl-C in the same burst as text would flush the text from the tty)."""
        for key in keys:
            subprocess.run([*self.base, "send-keys", "-t", "t", key], check=True, timeout=30)
            time.sleep(0.15)

    def screen(self) -> str:
        """The whole transcript so far, wrapped lines joined."""
        return subprocess.run([*self.base, "capture-pane", "-p", "-J", "-S", "-", "-t", "t"],
                              capture_output=True, text=True, timeout=30).stdout

    def wait(self, what: str, done: Callable[[str], bool], timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if done(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


def _prompts(text: str) -> int:
    return len(re.findall(r"^you> ", text, flags=re.M))


def _answer_streams(text: str) -> bool:
    """The last line is an answer with a few tokens printed."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and lines[-1].startswith("assistant> ") and len(lines[-1]) > 20


def test_chat_line_editing_and_ctrl_c(chat_model, tmp_path):
    exit_file = tmp_path / "status"
    chat = shlex.join([sys.executable, "-m", "fuselm", "chat", "--model", str(chat_model),
                       "--load-format", "dummy", "--device", "cpu", "--max-model-len", "8192",
                       # 2000: the stopped first answer joins the history, and prompt +
                       # max_tokens must stay within the context however fast it streamed
                       "--max-tokens", "2000", "--ignore-eos"])
    # the tmux server starts with this process's environment, less Triton's interpreter
    term = Terminal(tmp_path / "tmux.sock", f"env -u TRITON_INTERPRET {chat}; "
                    f"echo $? > {shlex.quote(str(exit_file))}; sleep 60")
    try:
        term.wait("the prompt", lambda t: _prompts(t) == 1)
        # type "helo wrld", then fix both words with the arrow keys
        term.keys("helo wrld", "Left", "Left", "Left", "o", "Home", "Right", "Right", "Right",
                  "l", "Enter")
        term.wait("the first answer", _answer_streams)
        term.keys("C-c")
        first = term.wait("the prompt after Ctrl-C", lambda t: _prompts(t) == 2)
        assert "[stopped]" in first and "^[[" not in first
        term.keys("second", "Enter")
        term.wait("the second answer", _answer_streams)
        term.keys("C-c")
        term.wait("the prompt", lambda t: _prompts(t) == 3)
        term.keys("/history", "Enter")
        shown = term.wait("the history", lambda t: _prompts(t) == 4)
        history = shown.split("you> /history", 1)[1]
        roles = re.findall(r"^(user|assistant): ?(.*)$", history, flags=re.M)
        assert [r for r, _ in roles] == ["user", "assistant", "user", "assistant"], history
        assert roles[0][1] == "hello world" and roles[2][1] == "second"
        assert roles[1][1].strip() and roles[3][1].strip()  # the stopped answers, kept
        term.keys("junk")
        term.keys("C-c")  # drops the typed text, keeps the chat
        term.wait("a fresh prompt", lambda t: _prompts(t) == 5)
        assert not exit_file.exists()
        term.keys("C-c")  # at an empty prompt: the end
        deadline = time.monotonic() + 30
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert exit_file.read_text().strip() == "0", term.screen()
        assert "Traceback" not in term.screen()
    finally:
        term.close()
