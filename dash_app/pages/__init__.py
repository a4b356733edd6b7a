"""One module per page: ``PATH``, ``TITLE``, ``layout(settings)``, ``register(app, data)`` and the pure
render functions the callbacks use (tested without a browser)."""
