"""The README's two commands come first, and CI runs exactly the test command."""
import re
from pathlib import Path


def readme_commands():
    text = Path("README.md").read_text()
    body = text.split("---", 2)[2]  # below the Spaces front matter
    return re.findall(r"```bash\n(.*?)\n```", body, flags=re.S)[:2]


def test_readme_starts_with_run_and_test_commands():
    run, test = readme_commands()
    assert "requirements.txt" in run and "python app.py" in run
    assert "requirements-dev.txt" in test and "pytest" in test
    body = Path("README.md").read_text().split("---", 2)[2].lstrip()
    assert body.startswith("```bash")


def test_ci_runs_the_readme_test_command():
    _, test = readme_commands()
    assert test in Path(".ci/run").read_text()


def test_spaces_front_matter():
    front = Path("README.md").read_text().split("---", 2)[1]
    for line in ("sdk: gradio", "app_file: app.py", "sdk_version: 6.31.0"):
        assert line in front
    assert "gradio==6.31.0" in Path("requirements.txt").read_text()
    assert "torch==2.13.0" in Path("requirements.txt").read_text()
