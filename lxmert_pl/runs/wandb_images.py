"""The report's cards as `wandb.Image`s with their detections in wandb's box format (class labels from the
detector's vocabulary), for the predictions table an evaluation logs."""

from __future__ import annotations

from PIL import Image

from lxmert_pl.report.cards import Card

WANDB_LONG_SIDE = 256  # the picture logged per card, long side in pixels (boxes are relative: any size works)


def wandb_box_data(card: Card, max_boxes: int) -> tuple[list[dict], dict[int, str]]:
    """wandb `box_data` (relative coordinates) and `class_labels` of a card's most confident boxes."""
    det = card.detections
    width, height = det.image.size
    boxes, labels = [], {}
    for box, class_id, caption, conf, name in list(zip(det.boxes, det.object_ids, det.labels, det.confidences,
                                                       det.class_names))[:max_boxes]:
        x1, y1, x2, y2 = (float(v) for v in box)
        boxes.append({
            "position": {"minX": max(0.0, x1 / width), "maxX": min(1.0, x2 / width),
                         "minY": max(0.0, y1 / height), "maxY": min(1.0, y2 / height)},
            "class_id": int(class_id), "box_caption": caption, "scores": {"confidence": float(conf)},
        })
        labels[int(class_id)] = name
    return boxes, labels


def wandb_card_image(card: Card, max_boxes: int = 10):
    """A card's picture (raw image or canvas, at most 256 px) as a `wandb.Image` with its boxes; None without one."""
    import wandb

    if card.detections is None:
        return None
    picture = card.detections.image.copy()
    picture.thumbnail((WANDB_LONG_SIDE, WANDB_LONG_SIDE), Image.LANCZOS)
    box_data, class_labels = wandb_box_data(card, max_boxes)
    caption = f"{card.row.get('sent', '')} (score {float(card.row.get('score', 0)):.3f})"
    return wandb.Image(picture, caption=caption,
                       boxes={"detections": {"box_data": box_data, "class_labels": class_labels}})


def log_report_images(run, galleries: dict[str, list[Card]], rows_limit: int) -> dict[int, object]:
    """Log each gallery's pictures under `report/<gallery>` (stored in the run's media files, offline runs too) and
    return {row position: wandb.Image} for the predictions table's `image` column (rows below `rows_limit`)."""
    by_row: dict[int, object] = {}
    for key, cards in galleries.items():
        images = []
        for card in cards:
            if card.position not in by_row:
                by_row[card.position] = wandb_card_image(card)
            if by_row[card.position] is not None:
                images.append(by_row[card.position])
        if images:
            run.log({f"report/{key}": images})
    return {position: image for position, image in by_row.items() if position < rows_limit and image is not None}
