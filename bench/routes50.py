"""The service with 50 more routes, for scripts/bench's scrape size: a set of series each."""

from application import app, asgi_app

__all__ = ["app", "asgi_app"]


def _item(item: int) -> dict[str, int]:
    return {"item": item}


for _number in range(50):
    app.add_url_rule(f"/r{_number}/<int:item>", f"r{_number}", _item)
