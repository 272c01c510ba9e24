//! Blank cells in a spreadsheet row. A range over rows of different lengths ends the shorter
//! rows in blanks, and real sheets have gaps; refusing either would make a planner clean every
//! sheet by hand.
//!
//! The rule: blanks before a row's first value and after its last are not part of its series
//! (the series starts and ends with the data); a blank between two values is filled in on the
//! straight line between its nearest values on each side, as spreadsheets' own forecasting
//! functions complete missing points; and at most [`MAX_MISSING_PERCENT`] of the cells from the
//! first value to the last may be blank, beyond which the row is refused at the blank that
//! crosses the limit. A blank is `null` or text of only white space (what an empty cell
//! becomes when a range is read).

use serde_json::Value;

/// Most of a row's span (first value to last) that may be blank.
pub const MAX_MISSING_PERCENT: usize = 30;

/// Whether a cell is blank.
pub fn is_blank(cell: &Value) -> bool {
    match cell {
        Value::Null => true,
        Value::String(text) => text.trim().is_empty(),
        _ => false,
    }
}

/// Why a row's blanks cannot be completed.
#[derive(Debug, PartialEq)]
pub enum Incomplete {
    /// Every cell is blank.
    Empty,
    /// The blank at `column` is one more than the row may have.
    TooManyMissing { column: usize, allowed: usize },
}

/// The row's series, its inner blanks (`None`) filled in; blanks at either end dropped.
pub fn complete(cells: &[Option<f64>]) -> Result<Vec<f64>, Incomplete> {
    let first = cells
        .iter()
        .position(Option::is_some)
        .ok_or(Incomplete::Empty)?;
    let last = cells
        .iter()
        .rposition(Option::is_some)
        .expect("a value exists");
    let span = &cells[first..=last];
    let allowed = span.len() * MAX_MISSING_PERCENT / 100;
    let mut missing = 0;
    let mut series = Vec::with_capacity(span.len());
    // The last value seen and where: the left end of the gap being filled.
    let mut left = (0, span[0].expect("the span starts with a value"));
    for (i, cell) in span.iter().enumerate() {
        match *cell {
            Some(value) => {
                let (from, start) = left;
                let gap = i - from;
                for step in 1..gap {
                    series.push(start + (value - start) * step as f64 / gap as f64);
                }
                series.push(value);
                left = (i, value);
            }
            None => {
                missing += 1;
                if missing > allowed {
                    return Err(Incomplete::TooManyMissing {
                        column: first + i,
                        allowed,
                    });
                }
            }
        }
    }
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn blanks_are_null_or_white_space() {
        for blank in [json!(null), json!(""), json!("  \t")] {
            assert!(is_blank(&blank), "{blank}");
        }
        for not in [json!(0), json!("x"), json!(false), json!([])] {
            assert!(!is_blank(&not), "{not}");
        }
    }

    #[test]
    fn inner_blanks_lie_on_the_line_between_their_neighbours_and_ends_are_dropped() {
        let row = [
            None,
            Some(1.0),
            None,
            Some(3.0),
            None,
            None,
            Some(0.0),
            None,
            None,
        ];
        // Span 1.0 .. 0.0 is 6 cells, 3 blank: over 30 %.
        assert_eq!(
            complete(&row),
            Err(Incomplete::TooManyMissing {
                column: 4,
                allowed: 1
            })
        );
        let row = [
            None,
            Some(10.0),
            Some(12.0),
            None,
            Some(16.0),
            Some(16.0),
            None,
            None,
            Some(7.0),
            Some(8.0),
            Some(9.0),
            Some(10.0),
            None,
        ];
        assert_eq!(
            complete(&row).unwrap(),
            vec![10.0, 12.0, 14.0, 16.0, 16.0, 13.0, 10.0, 7.0, 8.0, 9.0, 10.0]
        );
        let full = [Some(1.0), Some(2.0), Some(3.0)];
        assert_eq!(complete(&full).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(complete(&[None, None]), Err(Incomplete::Empty));
    }
}
