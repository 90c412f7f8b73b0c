from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs.mcp_server import MCP_PATH, serve_http, serve_stdio, stdio_user


class Command(BaseCommand):
    help = (
        "Serve the Autopack MCP tools. Default: stdio for a local assistant, acting as --user "
        "(an active staff user; control tools also need runs.control_run, model changes "
        f"routing.override_model). --http: streamable HTTP at {MCP_PATH}, where every request "
        "authenticates with the REST API's token (Authorization: Token <key>)."
    )
    # In stdio mode stdout carries the MCP protocol, and the check framework may write its
    # report there; `manage.py check` covers the checks.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--user", dest="username", help="stdio only (required there): the user to act as"
        )
        parser.add_argument(
            "--http", action="store_true", help=f"serve streamable HTTP at {MCP_PATH} instead"
        )
        parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
        parser.add_argument("--port", type=int, default=8766, help="HTTP port")

    def handle(
        self,
        *args: object,
        username: str | None,
        http: bool,
        host: str,
        port: int,
        **options: object,
    ) -> None:
        if http:
            if username:
                raise CommandError("--user is for stdio; over HTTP each request's token says who")
            self.stderr.write(f"Autopack MCP server on http://{host}:{port}{MCP_PATH}")
            serve_http(host=host, port=port)
            return
        if not username:
            raise CommandError("stdio needs --user USERNAME (an active staff user)")
        try:
            user = stdio_user(username=username)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        serve_stdio(user_id=int(user.pk))
