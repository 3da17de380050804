"""MiniMind's `streamlit run scripts/web_demo.py [-- FLAGS]`: the web UI page of
minimind/serve/web_app.py (flags: `minimind web --help-page`). `minimind web` starts the same."""

from minimind.serve.web_app import page

if __name__ == "__main__":  # Streamlit runs this file as __main__ on every interaction
    page()
