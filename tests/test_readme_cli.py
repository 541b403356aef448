"""The README's "Command line" table and the CLI agree: every command once, every flag it names real."""

import re
from pathlib import Path

import click

from vdeploy.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def command_table() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Command line"):]
    section = section[:section.index("\n## ", 3)]
    return [line for line in section.splitlines() if line.startswith("| `vdeploy ")]


def resolve(words: list[str]) -> click.Command:
    command = main
    for word in words:
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        command = command.commands[word]
    return command


def leaf_commands(group: click.Group, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += leaf_commands(command, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


def test_every_command_is_in_the_table_once():
    rows = [re.match(r"\| `vdeploy ([^`]*)`", row).group(1) for row in command_table()]
    named = []
    for row in rows:
        words = [w for w in row.split() if re.fullmatch(r"[a-z][a-z-]*", w)]
        path = []
        command = main
        for word in words:
            if isinstance(command, click.Group) and word in command.commands:
                path.append(word)
                command = command.commands[word]
        named.append(tuple(path))
    for leaf in leaf_commands(main):
        assert named.count(leaf) == 1, f"`vdeploy {' '.join(leaf)}` is in the README table {named.count(leaf)} times"


def test_every_flag_in_the_table_exists():
    for row in command_table():
        usage = re.match(r"\| `vdeploy ([^`]*)`", row).group(1)
        command = resolve(usage.split())
        flags = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for flag in re.findall(r"--[a-z][a-z0-9-]*", usage):
            assert flag in flags, f"README names `{flag}` for `vdeploy {command.name}`, which has no such option"
