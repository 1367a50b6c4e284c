from selfserve import create_app

app = create_app()
