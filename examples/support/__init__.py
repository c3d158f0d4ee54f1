"""A customer-support desk served by dspex-trio: the program module (``programs.py``) and a websocket
client (``client.py``). See README.md beside this file."""
