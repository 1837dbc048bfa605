"""The web dashboard at ``/ui``: server-rendered pages (Jinja2, autoescaped) over the same
services as the API, a cookie sign-in with an API key, and a little plain JavaScript for the live
parts (docs/UI.md). ``session`` holds the cookie and CSRF rules, ``service`` the reads the pages
make, ``endpoints`` the routes (left out of the OpenAPI document)."""
