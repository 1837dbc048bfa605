"""Human-readable reports: standalone HTML pages for a job's report and a sweep.

``html`` renders them from Jinja2 templates (``templates/``, autoescaped); ``job`` and ``sweep``
decide what each section says, ``units`` writes the numbers (durations, decimal sizes, counts),
``notes`` turns the worker's notes into sentences, ``view`` holds what the templates draw, and
``charts`` draws the SVG charts (matplotlib imported lazily).
"""
