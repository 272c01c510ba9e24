#!/usr/bin/python3
"""Writes the sample sheets a planner starts from, and the picture of one filled in (README):
clients/calc/sales-forecast.ods, clients/excel/sales-forecast.xlsx and docs/img/calc-forecast.png
(the last needs pdftoppm, from Debian's poppler-utils).

Eight products' monthly sales over two years on sheet "History"; sheet "Forecast" holds
=XPAND.FORECAST(History.B2:Y9; 6; 80) over B2:S9: six months ahead, then the 80 % interval's
lower and upper bounds. The formula runs against a live gateway while the sheets are made, so the
files open with its last answer in the cells and the picture shows real forecasts:

    make run &                                           # a gateway and workers
    XPAND_URL=http://127.0.0.1:8080 XPAND_API_KEY=$(cat .xpand/dev-api-key) \\
        /usr/bin/python3 clients/calc/samples.py         # after `make clients`
"""

import math
import os
import shutil
import subprocess
import sys

import uno

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "calc"))
from drive import Office, prop, run  # noqa: E402  (the test driver starts soffice the same way)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PRODUCTS = ["Espresso beans", "Filter coffee", "Green tea", "Chai", "Cocoa", "Oat milk",
            "Paper cups", "Gift boxes"]
MONTHS = [f"{m} {y}" for y in (25, 26) for m in
          "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()]
AHEAD = ["Jan 27", "Feb 27", "Mar 27", "Apr 27", "May 27", "Jun 27"]


def sales(p):
    """Two years of one product: a level, a trend, a yearly season (a December peak for gift
    boxes and cocoa, a summer one for iced tea) and some noise, in whole units."""
    level = [420, 310, 180, 140, 90, 260, 900, 60][p]
    winter = p in (4, 7)
    out = []
    for t in range(24):
        season = math.cos(2 * math.pi * (t - (11 if winter else 6)) / 12)
        noise = math.sin(7.3 * t + p) * 0.04
        out.append(round(level * (1 + 0.012 * t) * (1 + (0.35 if winter else 0.12) * season + noise)))
    return out


def main():
    profile = f"/tmp/xpand-calc-samples-{os.getpid()}"
    office = Office(profile)
    try:
        office.install(os.path.join(ROOT, "clients", "calc", "xpand.oxt"))
        doc = office.desktop.loadComponentFromURL("private:factory/scalc", "_blank", 0,
                                                  (prop("Hidden", True),))
        history = doc.Sheets.getByIndex(0)
        history.Name = "History"
        history.getCellRangeByName("A1:Y1").setDataArray((("Product", *MONTHS),))
        history.getCellRangeByName("A2:Y9").setDataArray(
            tuple((name, *sales(p)) for p, name in enumerate(PRODUCTS)))
        doc.Sheets.insertNewByName("Forecast", 1)
        forecast = doc.Sheets.getByName("Forecast")
        header = ("Product", *AHEAD, *(f"low {m[:3]}" for m in AHEAD),
                  *(f"high {m[:3]}" for m in AHEAD))
        forecast.getCellRangeByName("A1:S1").setDataArray((header,))
        forecast.getCellRangeByName("A2:A9").setDataArray(tuple((n,) for n in PRODUCTS))
        done = run(doc, "Forecast", "=XPAND.FORECAST(History.B2:Y9;6;80)", "B2:S9", 60)
        if done["timed_out"] or isinstance(done["cells"][0][0], str):
            sys.exit(f"the formula did not fill: {done['cells'][0][:3]}")
        area = forecast.getCellRangeByName("B2:S9")
        area.NumberFormat = doc.NumberFormats.queryKey("0", doc.CharLocale, False)
        columns = forecast.Columns
        columns.getByIndex(0).Width = 3200
        forecast.getCellRangeByName("A1:S1").CharWeight = 150  # bold
        for c in range(1, 19):
            columns.getByIndex(c).Width = 1900
        doc.CurrentController.setActiveSheet(forecast)
        out = lambda *p: uno.systemPathToFileUrl(os.path.join(ROOT, *p))  # noqa: E731
        doc.storeToURL(out("clients", "calc", "sales-forecast.ods"), (prop("FilterName", "calc8"),))
        # The picture: the Forecast sheet as one landscape PDF page, then a PNG of it
        # (pdftoppm, from Debian's poppler-utils; headless Calc has no view to export a PNG).
        style = doc.StyleFamilies.getByName("PageStyles").getByName(forecast.PageStyle)
        style.IsLandscape, style.Width, style.Height = True, 29700, 5600
        style.LeftMargin = style.RightMargin = style.TopMargin = style.BottomMargin = 400
        style.ScaleToPagesX, style.ScaleToPagesY = 1, 1
        style.HeaderIsOn = style.FooterIsOn = False
        style.PrintGrid = True
        pdf = os.path.join(profile, "forecast.pdf")
        history.IsVisible = False
        doc.storeToURL(uno.systemPathToFileUrl(pdf), (prop("FilterName", "calc_pdf_Export"),))
        # Excel's sheet: the same data, the spill area empty and the formula to type beside it
        # (Calc would write its add-in's internal name into the file, which Excel cannot read).
        history.IsVisible = True
        area.setArrayFormula("")
        forecast.getCellRangeByName("A11").String = (
            "Select B2 and type =XPAND.FORECAST(History!B2:Y9, 6, 80): "
            "it spills the forecasts and the 80 % bounds over B2:S9.")
        doc.storeToURL(out("clients", "excel", "sales-forecast.xlsx"),
                       (prop("FilterName", "Calc MS Excel 2007 XML"),))
        doc.close(True)
        png = os.path.join(ROOT, "docs", "img", "calc-forecast")
        subprocess.run(["pdftoppm", "-png", "-r", "110", "-singlefile", "-f", "1", pdf, png],
                       check=True)
        print(f"filled in {done['last_s']:.2f} s; wrote the two sheets and the picture")
    finally:
        office.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
