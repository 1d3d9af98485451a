import Dataset
import XCTest

final class DatasetIssueTests: XCTestCase {
    func testIssueLineNamesFileAndReason() {
        XCTAssertEqual(DatasetIssue(path: "img/1_x/a.png", reason: "zero-byte file").description,
                       "skipped img/1_x/a.png: zero-byte file")
    }
}
