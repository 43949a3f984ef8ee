"""``metasep serve``: a small web app to separate a song, listen to its stems and remix them."""
