from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from notes.models import Note
from notes.tasks import create_note

try:
    from django.tasks.exceptions import TaskResultDoesNotExist
except ImportError:
    from django_tasks.exceptions import TaskResultDoesNotExist


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "notes/index.html", {"notes": Note.objects.order_by("-id")[:20]})


@require_POST
def add_note(request: HttpRequest) -> HttpResponse:
    """Enqueue the task; the worker writes the row. The page of the result follows it."""
    text = request.POST.get("text", "").strip()
    if not text:
        return HttpResponse("text is required", status=400)
    result = create_note.enqueue(text)
    return redirect("result", result_id=result.id)


def result(request: HttpRequest, result_id: str) -> HttpResponse:
    try:
        task_result = create_note.get_result(result_id)
    except TaskResultDoesNotExist:
        return HttpResponse("no such task result", status=404)
    value = task_result.return_value if task_result.status == "SUCCESSFUL" else None
    return render(request, "notes/result.html", {"result": task_result, "value": value})
