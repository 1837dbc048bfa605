"""Human-readable reports: standalone HTML pages for a job's report and a sweep, with server-side
SVG charts (``charts``, matplotlib imported lazily) and the pages themselves (``html``)."""
