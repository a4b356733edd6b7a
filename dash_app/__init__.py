"""The Plotly Dash dashboard: predict, catalogue, training and monitoring pages (``python -m dash_app``)."""
