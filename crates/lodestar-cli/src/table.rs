//! Tables that fit the terminal: columns as wide as their widest cell, and
//! when the row is wider than the terminal, the widest columns shortened
//! with `…` until it fits.

/// The width assumed when stdout is not a terminal and `COLUMNS` is unset:
/// wide enough that piped output is rarely cut.
const DEFAULT_WIDTH: usize = 160;

/// No column is shortened below this many characters.
const MIN_COLUMN: usize = 6;

/// Which side a column's cells are aligned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// A table to print: a header and rows of cells.
#[derive(Debug)]
pub(crate) struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra ones ignored.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines no wider than `width` characters (when the
    /// columns' minimums allow it).
    pub(crate) fn render(&self, width: usize) -> Vec<String> {
        let count = self.columns.len();
        let cell = |row: &Vec<String>, i: usize| row.get(i).map_or("", String::as_str).to_owned();
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (title, _))| {
                self.rows
                    .iter()
                    .map(|row| chars(&cell(row, i)))
                    .chain([title.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let gaps = count.saturating_sub(1);
        while widths.iter().sum::<usize>() + gaps > width {
            let Some((widest, &size)) = widths.iter().enumerate().max_by_key(|(_, w)| **w) else {
                break;
            };
            if size <= MIN_COLUMN {
                break;
            }
            widths[widest] = size - 1;
        }
        let titles: Vec<String> = self.columns.iter().map(|(t, _)| (*t).to_owned()).collect();
        std::iter::once(&titles)
            .chain(&self.rows)
            .map(|row| {
                let cells: Vec<String> = (0..count)
                    .map(|i| {
                        let text = fit(&cell(row, i), widths[i]);
                        let pad = widths[i].saturating_sub(chars(&text));
                        match self.columns[i].1 {
                            Align::Left if i + 1 == count => text,
                            Align::Left => format!("{text}{}", " ".repeat(pad)),
                            Align::Right => format!("{}{text}", " ".repeat(pad)),
                        }
                    })
                    .collect();
                cells.join(" ")
            })
            .collect()
    }

    /// Prints the table to stdout, fitted to the terminal.
    pub(crate) fn print(&self) {
        for line in self.render(terminal_width()) {
            println!("{line}");
        }
    }
}

fn chars(text: &str) -> usize {
    text.chars().count()
}

/// `text` cut to `width` characters, ending in `…` when cut.
fn fit(text: &str, width: usize) -> String {
    if chars(text) <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The terminal's width: `COLUMNS` if set, else the width of the terminal
/// on stdout, else [`DEFAULT_WIDTH`].
pub(crate) fn terminal_width() -> usize {
    if let Some(columns) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .filter(|c| *c > 0)
    {
        return columns;
    }
    // `None` when stdout is not a terminal.
    terminal_size::terminal_size_of(std::io::stdout())
        .map_or(DEFAULT_WIDTH, |(width, _)| usize::from(width.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut table = Table::new(&[
            ("ID", Align::Left),
            ("ADDRESS", Align::Left),
            ("WEIGHT", Align::Right),
        ]);
        table.row(vec![
            "route-guide-6f2a9c0d1e3b4a5f".into(),
            "127.0.0.1:50051".into(),
            "100".into(),
        ]);
        table.row(vec!["b".into(), "[::1]:1".into(), "7".into()]);
        table
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let lines = table().render(200);
        assert_eq!(
            lines[0],
            "ID                           ADDRESS         WEIGHT"
        );
        assert_eq!(
            lines[1],
            "route-guide-6f2a9c0d1e3b4a5f 127.0.0.1:50051    100"
        );
        assert_eq!(
            lines[2],
            "b                            [::1]:1              7"
        );
    }

    #[test]
    fn a_narrow_terminal_shortens_the_widest_column() {
        let lines = table().render(40);
        for line in &lines {
            assert!(chars(line) <= 40, "{line:?}");
        }
        assert!(lines[1].starts_with("route-guide-6f2a…"), "{lines:?}");
        assert!(lines[1].contains("127.0.0.1:50051"), "{lines:?}");
        // Never below the minimum, even when that overflows.
        let lines = table().render(5);
        assert!(lines[1].starts_with("route…"), "{lines:?}");
    }
}
