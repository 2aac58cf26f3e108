"""The CLIP audit service's client: the ``clip-audit`` command and the same calls from Python.

    from clip_audit_client import Client

    client = Client("https://audits.example.org", token)
    outcome = client.audit(project=3, model_config="model.json", checkpoint="model.safetensors",
                           probe="probe.npz", dataset="lesions.zip", max_flag_share=0.10,
                           options={"sae": {"n_latents": 4096}})
    if not outcome.passed:
        print(outcome.summary["verdict"], outcome.out)

Each call takes the options of the command of the same name (``clip-audit audit --help``), with dashes as
underscores, waits for the job, writes what the command writes to ``out`` and returns an :class:`Outcome`: the
command's exit code, whether it passed, the job's id and what the service answered. Input the service refuses, a
failed job or an unreachable service raise :class:`ClientError` with the command's exit code and message.

HTTP only (``requests``): no Django, no torch.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Callable

from . import cli

__all__ = ["Client", "ClientError", "Outcome"]

ClientError = cli.Stop  # .code: the command's exit code (2 input, 3 job failed, 4 unreachable), .message


@dataclass
class Outcome:
    code: int  # the command's exit code: 0 passed, 1 a gate failed
    id: int  # the audit's, correction's or explanation's id
    details: dict = field(default_factory=dict)  # what the service answered (summary, flags, state, result...)

    @property
    def passed(self) -> bool:
        return self.code == cli.EXIT_PASS

    def __getattr__(self, name: str):
        try:
            return self.__dict__["details"][name]
        except KeyError:
            raise AttributeError(name) from None


class Client:
    """The service at ``url``, called with an API token (a project member's, or one scoped to the project)."""

    def __init__(self, url: str, token: str, log: Callable[[str], None] | None = None):
        if not url or not token:
            raise ClientError(cli.EXIT_USAGE, "give the service's URL and an API token")
        self.url, self.token = url, token
        self.log = log or (lambda line: None)  # progress lines; print to see them

    def audit(self, **options) -> Outcome:
        """Register or reuse the model, probe and dataset, run an audit, download its report, gate on it."""
        return self._run("audit", cli.audit, options)

    def correct(self, **options) -> Outcome:
        """Make a corrected probe from an audit's flags, wait for its proof and re-audit, gate on it."""
        return self._run("correct", cli.correct, options)

    def explain(self, **options) -> Outcome:
        """Explain one image (``image=PATH`` or ``item=KEY``) with a finished audit."""
        return self._run("explain", cli.explain, options)

    def _run(self, command: str, call, options: dict) -> Outcome:
        args = self._args(command, options)
        code = call(args, self.log)
        outcome = getattr(args, "outcome", {})
        return Outcome(code, outcome.get("id"), outcome)

    def _args(self, command: str, options: dict) -> argparse.Namespace:
        """The command's parsed arguments: its defaults, then ``options``; an unknown option or a missing
        required one is a TypeError naming it, as for any Python call."""
        sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        actions = [a for a in sub._actions if a.dest != "help"]
        known = {a.dest for a in actions}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"{command}() got unknown options {', '.join(unknown)}; it takes "
                            f"{', '.join(sorted(known))}")
        missing = sorted(a.dest for a in actions if a.required and a.dest not in options)
        if missing:
            raise TypeError(f"{command}() needs {', '.join(missing)}")
        groups = [g for g in sub._mutually_exclusive_groups if g.required]
        for group in groups:
            given = [a.dest for a in group._group_actions if options.get(a.dest) is not None]
            if len(given) != 1:
                raise TypeError(f"{command}() needs exactly one of "
                                f"{', '.join(a.dest for a in group._group_actions)}")
        values = {a.dest: a.default for a in actions}
        if isinstance(options.get("options"), dict):  # audit options as a dict, as the API takes them
            options = {**options, "options": json.dumps(options["options"])}
        return argparse.Namespace(url=self.url, token=self.token, command=command, **{**values, **options})
