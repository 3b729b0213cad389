"""The README's quick-start commands are exactly what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip().startswith((".venv/", "python3 -m venv"))
    ]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    readme_commands = _commands(quick_start)
    assert len(readme_commands) == 2
    assert _commands((ROOT / ".ci" / "run").read_text()) == readme_commands
    assert "mpdeploy build" in readme_commands[0] and "pytest" in readme_commands[1]
